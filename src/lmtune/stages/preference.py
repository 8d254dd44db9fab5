"""dpo: learn from preference pairs directly, against a frozen reference policy or without one.

Each micro batch holds `micro_batch_size` pairs; their chosen and rejected
answers go through the model in one forward pass (one padding-free row, or one
padded block). A sequence's log-probability is the sum over its answer tokens.

The reference policy is the starting model (stages/reference.py): with LoRA the
same weights with the adapter switched off (never a second copy); with full
fine-tuning a frozen copy, or the reference log-probabilities computed once
before training (`precompute_ref_logps`). `orpo` and `simpo` need no reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from ..config.fields import Group, setting
from ..config.method import trains_adapters
from ..config.problem import Problem
from ..lazy import lazy
from .pairs import PairObjective, PairStage
from .reference import Reference, precomputed

if TYPE_CHECKING:
    from ..config.load import Resolved
    from ..config.schema import Config

torch = lazy("torch")
F = lazy("torch.nn.functional")
losses = lazy("lmtune.losses")

REFERENCE_FREE = ("orpo", "simpo")


class PreferenceArgs(Group):
    pref_beta: float = setting(
        0.1,
        "With `dpo` and `kto`: how strongly the policy is held near the reference model.",
        more="Stays closer to the reference; safer, learns the preference less.",
        less="Follows the preference data harder; can drift or degrade.",
        gt=0.0,
        llamafactory=("pref_beta",),
        axolotl=("rl_beta",),
    )
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = setting(
        "sigmoid",
        "With `dpo`: the preference loss. `sigmoid` is the original DPO, `ipo` a "
        "squared loss on length-averaged log-ratios, `hinge` a margin loss (SLiC); "
        "`orpo` (odds ratio plus SFT on the chosen answer) and `simpo` (length-"
        "averaged log-probabilities with a margin) need no reference model.",
        llamafactory=("pref_loss",),
    )
    simpo_gamma: float = setting(
        0.5,
        "With `pref_loss: simpo`: the target margin between chosen and rejected rewards.",
        more="Asks for a wider gap between chosen and rejected answers.",
        less="A narrower gap is enough; 0 is plain length-normalised preference.",
        ge=0.0,
        llamafactory=("simpo_gamma",),
    )
    dpo_label_smoothing: float = setting(
        0.0,
        "With `pref_loss: sigmoid`: the share of preference labels assumed flipped "
        "(conservative DPO); 0 trusts every pair.",
        ge=0.0,
        lt=0.5,
        llamafactory=("dpo_label_smoothing",),
        axolotl=("dpo_label_smoothing",),
    )
    pref_ftx: float = setting(
        0.0,
        "With `dpo`: weight of an added SFT loss (per-token negative log-likelihood) on the chosen answer.",
        more="Keeps the policy fluent on the chosen answers; the preference counts less.",
        less="Pure preference loss at 0.",
        ge=0.0,
        llamafactory=("pref_ftx",),
    )
    precompute_ref_logps: bool = setting(
        False,
        "With `dpo` or `kto` and `method: full`: compute the reference model's log-probabilities "
        "once before training, so training holds one model instead of two.",
        axolotl=("precompute_ref_log_probs",),
    )


@dataclass
class PairLogps:
    """Summed log-probabilities of the chosen and rejected answers, and their token counts."""

    chosen: "torch.Tensor"
    rejected: "torch.Tensor"
    chosen_tokens: "torch.Tensor"
    rejected_tokens: "torch.Tensor"

    @classmethod
    def split(cls, sums: "torch.Tensor", tokens: "torch.Tensor") -> "PairLogps":
        half = sums.shape[0] // 2  # the batch holds every chosen answer, then every rejected one
        return cls(sums[:half], sums[half:], tokens[:half].clamp(min=1), tokens[half:].clamp(min=1))

    def averages(self) -> tuple["torch.Tensor", "torch.Tensor"]:
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


class Preference(PairObjective):
    def __init__(self, config: "Config"):
        f = config.finetuning
        self.kind, self.beta = f.pref_loss, f.pref_beta
        self.options = dict(label_smoothing=f.dpo_label_smoothing, simpo_gamma=f.simpo_gamma, ftx=f.pref_ftx)
        self.method = f.method
        self.precompute = f.precompute_ref_logps and not trains_adapters(f.method)
        self.reference: Optional[Reference] = None

    def prepare(self, model: Any, batch_sets: list, run: Any, cache_folder: Optional[Path]) -> None:
        """Before training: the reference policy (unless reference-free), or its log-probabilities of every pair."""
        if self.kind in REFERENCE_FREE:
            return
        if self.precompute:
            precomputed(model, batch_sets, run, cache_folder, "ref_logps", _pair_sums)
            return
        self.reference = Reference(model, self.method, run)

    def _reference(self, model: Any, batch: dict[str, "torch.Tensor"], policy: PairLogps) -> Optional[PairLogps]:
        if self.kind in REFERENCE_FREE:
            return None
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
            return PairLogps(ref[:, 0], ref[:, 1], policy.chosen_tokens, policy.rejected_tokens)
        with self.reference.policy(model) as reference:
            sums, tokens = losses.sequence_logps(reference, batch)
        return PairLogps.split(sums, tokens)

    def summed_loss(self, model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        policy = PairLogps.split(*losses.sequence_logps(model, batch))
        reference = self._reference(model, batch, policy)
        loss, chosen, rejected = pair_losses(self.kind, self.beta, policy, reference, **self.options)
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "reward_margin": (chosen - rejected).sum(),
            "reward_accuracy": (chosen > rejected).float().sum(),
        }
        return loss.sum(), metrics


def _pair_sums(frozen: Any, batch: dict[str, "torch.Tensor"], pairs: int) -> list[list[float]]:
    sums, _ = losses.sequence_logps(frozen, batch)
    return [[float(sums[row]), float(sums[pairs + row])] for row in range(pairs)]


class DirectPreference(PairStage):
    name = "dpo"
    summary = "direct preference optimisation (and ipo, orpo, simpo, hinge)"
    settings = PreferenceArgs
    shares_prompts = True  # packed pairs compute their prompt once (exact: see pairs.shared_prompt_batch)

    def objective(self, config: "Config") -> Preference:
        return Preference(config)

    def rules(self, r: "Resolved") -> list[Problem]:
        c = r.config.finetuning
        out = super().rules(r)
        if c.precompute_ref_logps and trains_adapters(c.method):
            out.append(Problem("note", "precompute_ref_logps", "not needed with LoRA: the reference is the base with the adapter off"))
        if c.pref_loss != "simpo" and r.was_set("simpo_gamma"):
            out.append(Problem("warning", "simpo_gamma", f"ignored with pref_loss: {c.pref_loss}; it applies to simpo"))
        if c.pref_loss != "sigmoid" and c.dpo_label_smoothing > 0:
            out.append(Problem("warning", "dpo_label_smoothing", f"ignored with pref_loss: {c.pref_loss}; it applies to sigmoid"))
        return out


DPO = DirectPreference()
