"""grpo's mathematics: group-relative advantages, the clipped per-token loss, and how each variant averages it.

Tensors over answer tokens are flat: every answer's tokens one after the other, `answer_of` giving the answer
(0..answers-1 within the micro batch) each token belongs to, `mask` 0 for tokens left out of the loss
(`mask_truncated_completions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage of each answer, spread of each group). A group is `group` consecutive answers to one prompt:
    the advantage is the reward minus the group's mean, divided by the group's (unbiased) standard deviation
    plus 1e-4 when `scale` (GRPO; Dr. GRPO leaves it out)."""
    grouped = rewards.view(-1, group)
    spread = grouped.std(1, keepdim=True)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (spread + 1e-4)
    return advantages.reshape(-1), spread.reshape(-1)


@dataclass
class TokenTerms:
    """Per answer token: the loss before averaging, the KL to the reference (k3), and where the ratio was clipped."""

    loss: torch.Tensor
    kl: Optional[torch.Tensor]
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor


def token_terms(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, answer_of: torch.Tensor, mask: torch.Tensor,
    answers: int, epsilon: float, epsilon_high: float, sequence_level: bool,
    ref_logps: Optional[torch.Tensor] = None, beta: float = 0.0,
) -> TokenTerms:
    """-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL, per token.

    The ratio is pi / pi_old per token, or with `sequence_level` (GSPO) one per answer, exp of the mean of its
    tokens' log-ratios, shared by its tokens. KL: exp(ref - logp) - (ref - logp) - 1 (Schulman's k3)."""
    log_ratio = logps - old_logps
    if sequence_level:
        counts = torch.zeros(answers, dtype=logps.dtype, device=logps.device).index_add(0, answer_of, mask)
        sums = torch.zeros(answers, dtype=logps.dtype, device=logps.device).index_add(0, answer_of, log_ratio * mask)
        log_ratio = (sums / counts.clamp(min=1))[answer_of]
    ratio = torch.exp(log_ratio)
    advantage = advantages[answer_of]
    loss = -torch.min(ratio * advantage, ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantage)
    kl = None
    if ref_logps is not None and beta > 0:
        gap = ref_logps - logps
        kl = torch.exp(gap) - gap - 1
        loss = loss + beta * kl
    clipped_low = ((ratio < 1 - epsilon) & (advantage < 0)).to(logps.dtype)
    clipped_high = ((ratio > 1 + epsilon_high) & (advantage > 0)).to(logps.dtype)
    return TokenTerms(loss, kl, clipped_low, clipped_high)


def token_weights(
    kind: str, answer_of: torch.Tensor, mask: torch.Tensor, answer_tokens: torch.Tensor, *, step_answers: int,
    step_tokens: int, micro_tokens: int, step_micro_batches: int, max_new_tokens: int,
) -> torch.Tensor:
    """What each token's loss is multiplied by so the micro batches of a step (over all processes) add up to:

    grpo:    mean over answers of each answer's mean token loss        1 / (step_answers x tokens of its answer)
    dapo:    mean over every answer token of the step                  1 / step_tokens
    bnpo:    mean over micro batches of their mean token loss          1 / (step_micro_batches x micro_tokens)
    dr_grpo: sum over tokens / (answers x max_new_tokens), a constant  1 / (step_answers x max_new_tokens)

    `answer_tokens` counts each answer's tokens in the loss (`mask`); masked tokens weigh 0."""
    if kind == "grpo":
        weight = 1.0 / (step_answers * answer_tokens.clamp(min=1).to(mask.dtype))[answer_of]
    elif kind == "dapo":
        weight = torch.full_like(mask, 1.0 / max(step_tokens, 1))
    elif kind == "bnpo":
        weight = torch.full_like(mask, 1.0 / (step_micro_batches * max(micro_tokens, 1)))
    elif kind == "dr_grpo":
        weight = torch.full_like(mask, 1.0 / (step_answers * max_new_tokens))
    else:
        raise ValueError(f"grpo_loss: {kind} is not known")
    return weight * mask
