"""ppo's mathematics: per-token rewards with the KL penalty, GAE, the clipped losses, and the controllers.

The shapes are batch x answer width; `mask` is 1 on answer tokens.
"""

from __future__ import annotations

import math

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * (log pi - log pi_ref) on every answer token, and the score added on each answer's last token."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation; nothing flows past an answer's end."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean and unit variance over the masked entries."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token clipped surrogate loss, per-token 1 where the ratio was clipped)."""
    ratio = torch.exp(logps - old_logps)
    loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).float()
    return loss, clipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token clipped squared error of the value head."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


class AdaptiveKL:
    """Ziegler et al.'s controller: move the KL coefficient so the KL per answer approaches the target."""

    HORIZON = 10_000

    def __init__(self, value: float, target: float | None):
        self.value, self.target = value, target

    def update(self, kl: float, answers: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * answers / self.HORIZON
        return self.value


class RunningMoments:
    """Mean and variance of every score seen so far (Chan et al.'s parallel update), for `ppo_score_norm`."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def update(self, scores: torch.Tensor) -> None:
        n = scores.numel()
        batch_mean, batch_var = float(scores.mean()), float(scores.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.count = total

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.mean) / math.sqrt(self.var + 1e-8)
