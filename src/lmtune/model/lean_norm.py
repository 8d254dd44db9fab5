"""RMS norms that keep only their input for the backward pass.

A transformers RMSNorm (`weight * x * rsqrt(mean(x^2) + eps)`, or `1 + weight`
in Gemma) keeps its input and its normalised output, two hidden-width
activations per norm, two norms per block. Here the norm runs once without a
graph and is recomputed from its input in the backward pass (an elementwise
pass, well under a per cent of a step), so half of what norms keep is never
kept. The recomputation runs the model's own forward, so every number,
gradients included, is the same.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch


class _RecomputedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.norm, ctx.params = norm, params
        ctx.save_for_backward(x)
        return norm(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        wanted = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(wanted[0])
            out = ctx.norm(leaf)
        inputs = [t for t, want in zip((leaf, *ctx.params), wanted) if want]
        grads = iter(torch.autograd.grad(out, inputs, grad))
        return (None, *(next(grads) if want else None for want in wanted))


def _lean_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    params = tuple(self.parameters(recurse=False))
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _RecomputedNorm.apply(self._plain_forward, x, *params)
    return self._plain_forward(x)


def use_lean_norms(model: torch.nn.Module) -> int:
    """Give every trained RMS norm the recomputing forward; returns how many.

    A frozen norm (LoRA, qlora) keeps only its input already: its scale needs no
    gradient, so the normalised output is never kept, and recomputing would only cost time.
    """
    count = 0
    for module in model.modules():
        trained = any(p.requires_grad for p in module.parameters(recurse=False))
        if type(module).__name__.endswith("RMSNorm") and trained and "_plain_forward" not in module.__dict__:
            module._plain_forward = types.MethodType(type(module).forward, module)
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
