"""Optimizers and learning-rate schedules, one-to-one from the config."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..config.schema import TrainingArgs


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm scales are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused_possible(groups: list[dict[str, Any]]) -> bool:
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)


def build_optimizer(model: torch.nn.Module, t: TrainingArgs) -> torch.optim.Optimizer:
    groups = parameter_groups(model, t.weight_decay)
    betas = (t.adam_beta1, t.adam_beta2)
    name = t.optimizer
    # The fused kernel is the same algorithm in one pass over all parameters (CPU and CUDA): a quarter of
    # the per-parameter loop's time on CPU. `adamw_torch_fused` insists on it; where it cannot run, the loop does.
    fused = _fused_possible(groups)
    if name in ("adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, fused=fused or name.endswith("fused"))
    if name == "adam":
        return torch.optim.Adam(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.momentum, nesterov=t.nesterov)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=t.learning_rate, momentum=t.momentum, eps=t.adam_epsilon)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=t.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon)
    raise ValueError(f"optimizer: {name} is not known")


def warmup_steps(t: TrainingArgs, total_steps: int) -> int:
    return t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)


def lr_factor(t: TrainingArgs, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each optimizer step."""
    warm = warmup_steps(t, total_steps)
    floor = t.min_lr_ratio
    kind = t.lr_scheduler

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm  # the first step already trains, at 1/warm of the peak
        if kind == "constant_with_warmup":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        if kind == "linear":
            shape = 1.0 - progress
        elif kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif kind == "cosine_with_restarts":
            if progress >= 1.0:
                shape = 0.0
            else:
                shape = 0.5 * (1.0 + math.cos(math.pi * ((t.lr_cycles * progress) % 1.0)))
        elif kind == "polynomial":
            shape = (1.0 - progress) ** t.lr_power
        else:
            raise ValueError(f"lr_scheduler: {kind} is not known")
        return floor + (1.0 - floor) * shape

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingArgs, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t, total_steps))
