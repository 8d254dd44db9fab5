"""Gated feed-forward blocks that keep two activations for the backward pass instead of four.

`down(act(gate(x)) * up(x))` (Llama, Mistral, Qwen, Gemma and most decoders
since) keeps, per token, gate(x) for act's backward, act(gate(x)) and up(x) for
the product's, and the product for down's: four tensors of the intermediate
width, the largest activations of the model. Here the gated product is one
autograd function that keeps gate(x) and up(x) and recomputes the rest in the
backward pass (an elementwise recomputation, a few per cent of a step), so a
quarter of the feed-forward activations are never kept. The product and every
gradient are the same numbers.
"""

from __future__ import annotations

import types
from typing import Any

import torch


class _GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: torch.nn.Module) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(True)
            activated = ctx.act(leaf)
        (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return grad_gate, grad * activated.detach(), None


def _lean_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return self.down_proj(_GatedProduct.apply(gate, up, self.act_fn))
    return self.down_proj(self.act_fn(gate) * up)


def use_lean_mlp(model: torch.nn.Module) -> int:
    """Give every gated feed-forward block of the usual shape the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("MLP"):
            continue
        if all(isinstance(getattr(module, name, None), torch.nn.Module) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count
