"""What a stage is: one self-describing unit that the engine and the shared rules run without naming it.

A `Stage` holds what `check`, `explain` and the data step need, without torch:
its own settings (flat keys like every other setting), the record kinds it
learns from, its config rules, and what it supports on several processes. It
builds the torch side when a run starts: an `Objective` (how examples become
micro batches, the summed loss, what it is averaged over) that the shared loop
(engine/loop.py) runs, or names a recipe of its own when it needs its own loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional


if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from ..config.fields import Group
    from ..config.load import Resolved
    from ..config.problem import Problem
    from ..config.schema import Config
    from ..data.batches import Batches
    from ..engine.run import Run

class Objective:
    """The torch side of a stage that learns from a fixed dataset; the shared loop calls these."""

    def batches(self, examples: Any, config: "Config", tokenizer: Any, shuffle: bool, for_eval: bool = False,
                **layout: Any) -> "Batches":
        """Micro batches; `layout` carries packing (and pack_length, share_prompts where the stage takes them)."""
        raise NotImplementedError

    def summed_loss(self, model: Any, batch: dict) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        """The loss summed over the batch's units, and metrics summed the same way."""
        raise NotImplementedError

    def count(self, batch: dict) -> int:
        """Units in the batch (trained tokens, pairs, answers): what the summed loss is divided by."""
        raise NotImplementedError

    def prepare(self, model: Any, batch_sets: list["Batches"], run: "Run", cache_folder: Optional["Path"]) -> None:
        """Before the policy is placed, sharded or updated: keep what the loss compares against (a reference)."""

    def summarise(self, averaged: dict[str, float]) -> dict[str, float]:
        """The metrics to log, from the summed metrics divided by the units of a logging window or an evaluation."""
        return averaged

    def called_apart(self, model: Any) -> list[Any]:
        """Submodules the loss runs on their own, outside the model's forward (rm: the decoder, then the head):
        sharded as units of their own, so each gathers its weights when called."""
        return []


class Stage:
    """A training stage. Subclasses set the attributes and override what differs."""

    name: str = ""
    summary: str = ""  # the stage's words in the `stage` setting's documentation
    reads: frozenset[str] = frozenset()  # record kinds (data/records.py) it learns from
    settings: Optional[type["Group"]] = None  # its own settings; they join `finetuning`
    also_uses: tuple[str, ...] = ()  # settings of other stages it reads (kto: pref_beta)
    head: str = "lm"  # "lm": a causal LM; "reward": a scalar head (AutoModelForSequenceClassification)
    packs: bool = True  # its batches can be laid out padding-free
    packs_to_length: bool = False  # its rows can be filled with examples up to max_input_length
    shares_prompts: bool = False  # packed pairs may compute their prompt once
    unit: str = "tokens"  # what the loss is averaged over, logged as `<unit>_per_second`
    data_parallel: bool = True  # trains on several processes, each on its share of every step
    shards: bool = True  # trains sharded (FSDP2) with full fine-tuning
    evaluates_on_data: bool = True  # has a loss on held-out rows (`lmtune eval`)
    streams: bool = True  # learns from examples in stream order, one micro batch at a time (`streaming: true`)

    def keys(self) -> tuple[str, ...]:
        """Every stage-owned setting it reads."""
        own = tuple(self.settings.model_fields) if self.settings is not None else ()
        return own + self.also_uses

    def rules(self, r: "Resolved") -> list["Problem"]:
        """Its own checks of a validated config, before any model or data loads."""
        return []

    def record(self, record: dict[str, Any], which: str, number: int, config: "Config") -> dict[str, Any]:
        """A canonical record as the stage learns from it (ppo keeps the prompt side); raises DataError for a row
        the stage cannot learn from, naming it as the `number`th `which` ("training", "validation") row. Runs
        on each row in the process that tokenises it (`check` reads local data through it too)."""
        return record

    def tally(self, record: dict[str, Any]) -> Optional[str]:
        """What the stage counts over its training rows (kto: each label), for `tally_problem`."""
        return None

    def tally_problem(self, tallies: dict[Optional[str], int]) -> Optional[str]:
        """One line when the training rows, as tallied, cannot train the stage; None when they can."""
        return None

    def objective(self, config: "Config") -> Objective:
        raise NotImplementedError(f"stage {self.name} runs its own recipe")

    # Its own training loop, built from engine.run's parts, as "module:function" (the engine imports it, so the
    # stage's description does not import the engine); None runs the shared loop with `objective`.
    recipe: Optional[str] = None

    def layout_problem(self, config: "Config", processes: int, sharded: bool) -> Optional[str]:
        """One line naming the setting, when the stage cannot run the asked layout; None when it can."""
        if processes > 1 and not self.data_parallel:
            return f"stage: {self.name} trains in one process in this version; launch one process"
        if sharded and not self.shards:
            return f"enable_fsdp: stage {self.name} does not shard in this version; set enable_fsdp: false (it trains data parallel)"
        return None
