"""kto: learn from single answers labelled desirable or undesirable (Ethayarajh et al., 2024).

Rows are unpaired: a prompt, one answer and a label (TRL's prompt/completion/
label, LLaMA-Factory's conversations with `kto_tag`). With r = beta * (log pi(y|x)
- log pi_ref(y|x)) and z0 the reference point, the loss of an answer is

    desirable:    desirable_weight   * (1 - sigmoid(r - beta * z0))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * z0 - r))

averaged over the answers. z0 estimates KL(pi || pi_ref) from mismatched pairs
of the micro batch, as the paper does: each prompt with the answer of the next
example (a fixed partner, so the estimate can be precomputed), z0 = max(0,
mean(log pi - log pi_ref)), without gradient. A micro batch lays out its answers
and then the mismatched pairs, padding-free or padded. The reference is the
adapter switched off (LoRA), a frozen copy, or precomputed log-probabilities
(`precompute_ref_logps`), as for dpo (stages/reference.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..config.fields import Group, setting
from ..config.method import trains_adapters
from ..config.problem import Problem
from ..data.tokenize import IGNORE
from ..lazy import lazy
from .base import Objective, Stage
from .reference import Reference, precomputed

if TYPE_CHECKING:
    from ..config.load import Resolved
    from ..config.schema import Config
    from ..data.batches import Batches

torch = lazy("torch")
batching = lazy("lmtune.data.batches")
losses = lazy("lmtune.losses")


class KTOArgs(Group):
    desirable_weight: float = setting(
        1.0,
        "With `kto`: weight of the loss on desirable answers. Raise it when they are fewer than the undesirable ones "
        "(the paper keeps desirable_weight x desirable answers / (undesirable_weight x undesirable answers) in 1 to 4/3).",
        ge=0.0,
        llamafactory=("kto_chosen_weight",),
        axolotl=("kto_desirable_weight",),
    )
    undesirable_weight: float = setting(
        1.0,
        "With `kto`: weight of the loss on undesirable answers.",
        ge=0.0,
        llamafactory=("kto_rejected_weight",),
        axolotl=("kto_undesirable_weight",),
    )


def kto_losses(
    logps: "torch.Tensor", ref_logps: "torch.Tensor", kl_logps: "torch.Tensor", ref_kl_logps: "torch.Tensor",
    desirable: "torch.Tensor", beta: float, desirable_weight: float, undesirable_weight: float,
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(weighted loss per answer, reward per answer, the batch's reference point z0), from summed log-probabilities
    of each answer and of each mismatched pair under the policy and the reference."""
    z0 = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    reward = beta * (logps - ref_logps)
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(reward - beta * z0)),
        undesirable_weight * (1 - torch.sigmoid(beta * z0 - reward)),
    )
    return loss, reward.detach(), z0


def prompt_length(labels: Sequence[int]) -> int:
    """The untrained tokens an example starts with: its prompt."""
    for index, label in enumerate(labels):
        if label != IGNORE:
            return index
    return len(labels)


class UnpairedShape:
    """Batches' view of labelled answers: each example's sequence, then its mismatched pair (its prompt with the
    answer of the next example of the same list, cut to the longer of the two sequences)."""

    note = ", each answer with a mismatched pair for the KL estimate"

    def __init__(self, examples: Sequence[dict[str, Any]]):
        self.examples = examples
        self.position = {id(e): i for i, e in enumerate(examples)}

    def _mismatched(self, example: dict[str, Any]) -> dict[str, list[int]]:
        partner = self.examples[(self.position[id(example)] + 1) % len(self.examples)]
        cut, partner_cut = prompt_length(example["labels"]), prompt_length(partner["labels"])
        answer = list(partner["input_ids"][partner_cut:])
        limit = max(len(example["input_ids"]), len(partner["input_ids"]))
        ids = (list(example["input_ids"][:cut]) + answer)[:limit]
        return {"input_ids": ids, "labels": ([IGNORE] * cut + answer)[:limit]}

    def length(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"]) + len(self._mismatched(example)["input_ids"])

    def sequences(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples] + [self._mismatched(e) for e in examples]

    def collate(self, examples: Sequence[dict[str, Any]], packing: bool, pad_id: int) -> dict[str, "torch.Tensor"]:
        sequences = self.sequences(examples)
        batch = batching.packed_batch(sequences) if packing else batching.pad_batch(sequences, pad_id)
        batch["desirable"] = torch.tensor([bool(e["label"][0]) for e in examples])
        if "ref_logps" in examples[0]:
            batch["ref_logps"] = torch.tensor([list(map(float, e["ref_logps"])) for e in examples], dtype=torch.float32)
        return batch


def _answer_and_kl_sums(model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:
    sums, _ = losses.sequence_logps(model, batch)
    answers = sums.shape[0] // 2
    return sums[:answers], sums[answers:]


class KTO(Objective):
    """The objective: loss averaged over answers; metrics kl, rewards of each class and their margin."""

    def __init__(self, config: "Config"):
        f = config.finetuning
        self.beta, self.weights = f.pref_beta, (f.desirable_weight, f.undesirable_weight)
        self.method = f.method
        self.precompute = f.precompute_ref_logps and not trains_adapters(f.method)
        self.reference: Optional[Reference] = None

    def batches(self, examples: Any, config: "Config", tokenizer: Any, shuffle: bool, for_eval: bool = False,
                packing: bool = False) -> "Batches":
        t = config.training
        size = config.evaluation.per_device_eval_batch_size if for_eval else t.micro_batch_size
        examples = list(examples)  # one dict per example, kept: the shape finds each one's partner by identity
        return batching.Batches(examples, size, tokenizer.pad_token_id, packing=packing, shuffle=shuffle, seed=t.seed,
                                shape=UnpairedShape(examples))

    def prepare(self, model: Any, batch_sets: list, run: Any, cache_folder: Optional[Path]) -> None:
        if self.precompute:
            def values(frozen: Any, batch: dict, answers: int) -> list[list[float]]:
                sums, kl_sums = _answer_and_kl_sums(frozen, batch)
                return [[float(sums[i]), float(kl_sums[i])] for i in range(answers)]

            precomputed(model, batch_sets, run, cache_folder, "ref_logps", values)
        else:
            self.reference = Reference(model, self.method, run)

    def count(self, batch: dict[str, "torch.Tensor"]) -> int:
        return int(batch["desirable"].numel())

    def summed_loss(self, model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        logps, kl_logps = _answer_and_kl_sums(model, batch)
        if "ref_logps" in batch:
            ref_logps, ref_kl_logps = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
        else:
            with self.reference.policy(model) as reference:
                ref_logps, ref_kl_logps = _answer_and_kl_sums(reference, batch)
        desirable = batch["desirable"].to(logps.device)
        loss, reward, z0 = kto_losses(logps, ref_logps.to(logps), kl_logps, ref_kl_logps.to(logps), desirable, self.beta, *self.weights)
        wanted = desirable.to(reward.dtype)
        metrics = {
            "kl": z0 * len(reward),
            "rewards/desirable": (reward * wanted).sum(),
            "rewards/undesirable": (reward * (1 - wanted)).sum(),
            "count/desirable": wanted.sum(),
            "count/undesirable": (1 - wanted).sum(),
        }
        return loss.sum(), metrics

    def summarise(self, averaged: dict[str, float]) -> dict[str, float]:
        """Each class's mean reward (both sums were divided by the same count of answers) and their margin."""
        out = {k: v for k, v in averaged.items() if not k.startswith(("count/", "rewards/"))}
        for side in ("desirable", "undesirable"):
            count = averaged.get(f"count/{side}", 0.0)
            if count > 0:
                out[f"rewards/{side}"] = averaged[f"rewards/{side}"] / count
        if "rewards/desirable" in out and "rewards/undesirable" in out:
            out["reward_margin"] = out["rewards/desirable"] - out["rewards/undesirable"]
        return out


class KahnemanTversky(Stage):
    name = "kto"
    streams = False  # each answer is compared with answers of other rows
    summary = "Kahneman-Tversky optimisation on single answers labelled desirable or undesirable"
    reads = frozenset({"unpaired"})
    settings = KTOArgs
    also_uses = ("pref_beta", "precompute_ref_logps")
    unit = "answers"

    def objective(self, config: "Config") -> KTO:
        return KTO(config)

    def rules(self, r: "Resolved") -> list[Problem]:
        c, fmt = r.config.finetuning, r.config.data.dataset_format
        out = []
        if fmt not in ("auto", "unpaired"):
            out.append(Problem("error", "dataset_format", f"stage kto learns from answers labelled desirable or undesirable, but "
                               f"dataset_format is {fmt}; use dataset_format: unpaired (prompt, completion, label)"))
        for key, side in (("desirable_weight", "desirable"), ("undesirable_weight", "undesirable")):
            if getattr(c, key) == 0:
                out.append(Problem("error", key, f"0 leaves {side} answers out of the loss, so kto would learn from one side only; "
                                   "use a weight above 0 (1.0 by default)"))
        if c.precompute_ref_logps and trains_adapters(c.method):
            out.append(Problem("note", "precompute_ref_logps", "not needed with LoRA: the reference is the base with the adapter off"))
        return out

    def tally(self, record: dict[str, Any]) -> Optional[str]:
        return "desirable" if record["label"] else "undesirable"

    def tally_problem(self, tallies: dict[Optional[str], int]) -> Optional[str]:
        """Both labels must be in the training rows: with one, the loss only pushes every answer one way."""
        if len(tallies) != 1:
            return None
        [(side, count)] = tallies.items()
        other = "undesirable (label: false)" if side == "desirable" else "desirable (label: true)"
        return f"dataset: all {count} kto training rows are {side}; kto needs both kinds: add {other} rows"


KTO_STAGE = KahnemanTversky()
