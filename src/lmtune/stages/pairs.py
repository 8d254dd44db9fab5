"""What rm and dpo share: preference pairs as micro batches, a loss averaged over pairs, and their data rule.

A pair's chosen and rejected answers are two sequences of one micro batch
(every chosen answer first, then every rejected one), padded or packed; packed
pairs may compute their shared prompt once (`shared_prompt_batch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..config.problem import Problem
from ..data.tokenize import IGNORE
from ..lazy import lazy
from .base import Objective, Stage

if TYPE_CHECKING:
    from ..config.load import Resolved
    from ..config.schema import Config
    from ..data.batches import Batches

torch = lazy("torch")
batching = lazy("lmtune.data.batches")


def _shared_prompt_length(pair: dict[str, Any]) -> int:
    """Tokens the chosen and rejected sequences share at their start, untrained in both (the prompt), leaving
    each at least one token of its own."""
    chosen, rejected = pair["chosen_input_ids"], pair["rejected_input_ids"]
    chosen_labels, rejected_labels = pair["chosen_labels"], pair["rejected_labels"]
    limit = min(len(chosen), len(rejected)) - 1
    length = 0
    while (
        length < limit
        and chosen[length] == rejected[length]
        and chosen_labels[length] == IGNORE
        and rejected_labels[length] == IGNORE
    ):
        length += 1
    return length


def shared_prompt_batch(pairs: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Each pair as one padding-free segment: the prompt once, the chosen answer, then the rejected answer.

    The rejected answer attends to the prompt and to itself, never to the chosen
    answer, and its positions continue from the prompt, so both answers see what
    they would see in their own sequences while the prompt is computed once.
    Because a token is then not always predicted by the row before it, the
    trained tokens are listed with the row that predicts each (`target_rows`)
    and the sequence they belong to (every chosen answer first, then every
    rejected one, as in unshared batches).
    """
    count = len(pairs)
    ids: list[int] = []
    positions: list[int] = []
    bounds, branches = [0], []
    targets: list[int] = []
    rows: list[int] = []
    sequences: list[int] = []
    sequence_tokens = 0
    for index, pair in enumerate(pairs):
        chosen, rejected = list(pair["chosen_input_ids"]), list(pair["rejected_input_ids"])
        chosen_labels, rejected_labels = pair["chosen_labels"], pair["rejected_labels"]
        shared = _shared_prompt_length(pair)
        start = bounds[-1]
        rejected_start = start + len(chosen)
        ids += chosen + rejected[shared:]
        positions += list(range(len(chosen))) + list(range(shared, len(rejected)))
        for i in range(1, len(chosen)):
            if chosen_labels[i] != IGNORE:
                targets.append(chosen[i])
                rows.append(start + i - 1)
                sequences.append(index)
        for i in range(1, len(rejected)):
            if rejected_labels[i] != IGNORE:
                before = i - 1
                targets.append(rejected[i])
                rows.append(start + before if before < shared else rejected_start + before - shared)
                sequences.append(count + index)
        branches.append((shared, len(chosen)))  # within the segment: where the prompt ends, where the rejected answer starts
        bounds.append(rejected_start + len(rejected) - shared)
        sequence_tokens += len(chosen) + len(rejected)
    as_row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
    return {
        "input_ids": as_row(ids),
        "position_ids": as_row(positions),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.long),
        "prompt_branches": torch.tensor(branches, dtype=torch.long),
        "target_ids": torch.tensor(targets, dtype=torch.long),
        "target_rows": torch.tensor(rows, dtype=torch.long),
        "target_sequences": torch.tensor(sequences, dtype=torch.long),
        "sequence_tokens": torch.tensor(sequence_tokens),
    }


class PairShape:
    """Batches' view of preference pairs (see data.batches.Sequences)."""

    def __init__(self, share_prompts: bool = False):
        self.share_prompts = share_prompts
        self.note = ", each pair's prompt computed once" if share_prompts else ""

    def length(self, pair: dict[str, Any]) -> int:
        return len(pair["chosen_input_ids"]) + len(pair["rejected_input_ids"])

    def lengths(self, pairs: Sequence[dict[str, Any]]) -> list[int]:
        if hasattr(pairs, "field_lengths"):  # mapped columns: from the offsets alone
            return (pairs.field_lengths("chosen_input_ids") + pairs.field_lengths("rejected_input_ids")).tolist()
        return [self.length(p) for p in pairs]

    def sequences(self, pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every chosen answer, then every rejected one."""
        return [
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for pair in pairs
        ]

    def collate(self, pairs: Sequence[dict[str, Any]], packing: bool, pad_id: int) -> dict[str, "torch.Tensor"]:
        if packing and self.share_prompts:
            batch = shared_prompt_batch(pairs)
        else:
            sequences = self.sequences(pairs)
            batch = batching.packed_batch(sequences) if packing else batching.pad_batch(sequences, pad_id)
        batch["pairs"] = torch.tensor(len(pairs))
        if "margin" in pairs[0]:
            batch["margin"] = torch.tensor([float(p["margin"][0]) for p in pairs])
        if "ref_logps" in pairs[0]:  # dpo's reference log-probabilities, computed before training
            batch["ref_logps"] = torch.tensor([list(map(float, p["ref_logps"])) for p in pairs], dtype=torch.float32)
        return batch


class PairObjective(Objective):
    """Micro batches of `micro_batch_size` pairs, and a loss averaged over pairs."""

    def batches(
        self, examples: Any, config: "Config", tokenizer: Any, shuffle: bool, for_eval: bool = False, packing: bool = False,
        share_prompts: bool = False,
    ) -> "Batches":
        t = config.training
        size = config.evaluation.per_device_eval_batch_size if for_eval else t.micro_batch_size
        return batching.Batches(
            examples, size, tokenizer.pad_token_id, packing=packing, shuffle=shuffle, seed=t.seed,
            shape=PairShape(share_prompts=share_prompts and packing),
        )

    def count(self, batch: dict[str, "torch.Tensor"]) -> int:
        return int(batch["pairs"])


class PairStage(Stage):
    reads = frozenset({"preference"})
    unit = "pairs"

    def rules(self, r: "Resolved") -> list[Problem]:
        fmt = r.config.data.dataset_format
        if fmt not in ("auto", "preference"):
            return [Problem("error", "dataset_format", f"stage {self.name} learns from preference pairs, but dataset_format is {fmt}; "
                            "use dataset_format: preference (prompt, chosen, rejected)")]
        return []
