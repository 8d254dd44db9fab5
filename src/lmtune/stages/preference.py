"""dpo: learn from preference pairs directly, against a frozen reference policy or without one.

Each micro batch holds `micro_batch_size` pairs; their chosen and rejected
answers go through the model in one forward pass (one padding-free row, or one
padded block). A sequence's log-probability is the sum over its answer tokens.

The reference policy is the starting model: with LoRA the same weights with the
adapter switched off (never a second copy); with full fine-tuning a frozen copy,
or the reference log-probabilities computed once before training
(`precompute_ref_logps`). `orpo` and `simpo` need no reference.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..config.schema import Config
from ..data.batches import Batches
from ..engine.loss import sequence_logps
from .pairs import PairStage

REFERENCE_FREE = ("orpo", "simpo")


@dataclass
class PairLogps:
    """Summed log-probabilities of the chosen and rejected answers, and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def split(cls, sums: torch.Tensor, tokens: torch.Tensor) -> "PairLogps":
        half = sums.shape[0] // 2  # the batch holds every chosen answer, then every rejected one
        return cls(sums[:half], sums[half:], tokens[:half].clamp(min=1), tokens[half:].clamp(min=1))

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens, self.rejected / self.rejected_tokens


def pair_losses(
    kind: str,
    beta: float,
    policy: PairLogps,
    reference: Optional[PairLogps],
    *,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    ftx: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair.

    sigmoid: -(1-e) log s(b x) - e log s(-b x), x = (pc - pr) - (rc - rr)        (DPO; e: label smoothing)
    hinge:   max(0, 1 - b x)                                                      (SLiC)
    ipo:     (x' - 1 / 2b)^2 with x' from length-averaged log-probabilities      (IPO)
    orpo:    -a_c - b log s(log odds(a_c) - log odds(a_r)), a = averaged logps  (ORPO; no reference)
    simpo:   -log s(b (a_c - a_r) - gamma)                                       (SimPO; no reference)
    ftx adds ftx * -a_c, an SFT loss on the chosen answer.
    """
    avg_chosen, avg_rejected = policy.averages()
    if kind in REFERENCE_FREE:
        chosen_reward, rejected_reward = beta * avg_chosen, beta * avg_rejected
        if kind == "simpo":
            loss = -F.logsigmoid(beta * (avg_chosen - avg_rejected) - simpo_gamma)
        else:
            log_odds = (avg_chosen - avg_rejected) - (
                torch.log1p(-torch.exp(avg_chosen).clamp(max=1 - 1e-6)) - torch.log1p(-torch.exp(avg_rejected).clamp(max=1 - 1e-6))
            )
            loss = -avg_chosen - beta * F.logsigmoid(log_odds)
    else:
        assert reference is not None
        chosen_reward = beta * (policy.chosen - reference.chosen)
        rejected_reward = beta * (policy.rejected - reference.rejected)
        if kind == "ipo":
            ref_chosen, ref_rejected = reference.averages()
            x = (avg_chosen - avg_rejected) - (ref_chosen - ref_rejected)
            loss = (x - 1 / (2 * beta)) ** 2
        else:
            x = (policy.chosen - policy.rejected) - (reference.chosen - reference.rejected)
            if kind == "hinge":
                loss = torch.relu(1 - beta * x)
            elif kind == "sigmoid":
                loss = -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)
            else:
                raise ValueError(f"pref_loss: {kind} is not known")
    if ftx:
        loss = loss + ftx * -avg_chosen
    return loss, chosen_reward.detach(), rejected_reward.detach()


def _unwrapped(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Which starting weights these are: each tensor's shape, sum and absolute sum (one pass, no copy)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().double()
        digest.update(f"{name}{tuple(tensor.shape)}{float(values.sum())!r}{float(values.abs().sum())!r}".encode())
    return digest.hexdigest()[:16]


class Preference(PairStage):
    shares_prompts = True  # packed pairs compute their prompt once (exact: see data.batches.shared_prompt_batch)

    def __init__(self, config: Config):
        f = config.finetuning
        self.kind, self.beta = f.pref_loss, f.pref_beta
        self.options = dict(label_smoothing=f.dpo_label_smoothing, simpo_gamma=f.simpo_gamma, ftx=f.pref_ftx)
        self.method = f.method
        self.precompute = f.precompute_ref_logps and f.method in ("full", "freeze")
        self.reference_model: Optional[torch.nn.Module] = None

    def prepare(self, model: Any, batch_sets: list[Batches], cache_folder: Optional[Path] = None) -> None:
        """Before training: keep the reference policy (unless reference-free or an adapter can be switched off)."""
        if self.kind in REFERENCE_FREE or self.method in ("lora", "qlora"):
            return
        if not self.precompute:
            self.reference_model = copy.deepcopy(_unwrapped(model)).eval().requires_grad_(False)
            return
        # One pass over every pair, kept beside the tokenised data (for the same starting weights), so a resumed
        # or repeated run reads them; they ride along with the examples, and training holds one model.
        stored = cache_folder / f"ref_logps-{weights_fingerprint(_unwrapped(model))}.json" if cache_folder else None
        if stored is not None and stored.exists():
            saved = json.loads(stored.read_text())
            if [len(b.examples) for b in batch_sets] == [len(values) for values in saved]:
                for batches, values in zip(batch_sets, saved):
                    for example, pair in zip(batches.examples, values):
                        example["ref_logps"] = pair
                return
        frozen = copy.deepcopy(_unwrapped(model)).eval().requires_grad_(False)
        device = next(frozen.parameters()).device
        for batches in batch_sets:
            examples = batches.examples
            for start in range(0, len(examples), batches.micro_batch_size):
                chunk = examples[start : start + batches.micro_batch_size]
                batch = {k: v.to(device) for k, v in batches.collate(chunk).items()}
                with torch.no_grad():
                    sums, _ = sequence_logps(frozen, batch)
                for row, example in enumerate(chunk):
                    example["ref_logps"] = [float(sums[row]), float(sums[len(chunk) + row])]
        del frozen
        if stored is not None:
            partial = stored.with_suffix(".partial")
            partial.write_text(json.dumps([[e["ref_logps"] for e in b.examples] for b in batch_sets]))
            partial.replace(stored)

    def _reference(self, model: Any, batch: dict[str, torch.Tensor], policy: PairLogps) -> Optional[PairLogps]:
        if self.kind in REFERENCE_FREE:
            return None
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
            return PairLogps(ref[:, 0], ref[:, 1], policy.chosen_tokens, policy.rejected_tokens)
        with torch.no_grad():
            if self.reference_model is not None:
                sums, tokens = sequence_logps(self.reference_model, batch)
            else:
                with _unwrapped(model).disable_adapter():
                    sums, tokens = sequence_logps(model, batch)
        return PairLogps.split(sums, tokens)

    def summed_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = PairLogps.split(*sequence_logps(model, batch))
        reference = self._reference(model, batch, policy)
        loss, chosen, rejected = pair_losses(self.kind, self.beta, policy, reference, **self.options)
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "reward_margin": (chosen - rejected).sum(),
            "reward_accuracy": (chosen > rejected).float().sum(),
        }
        return loss.sum(), metrics

