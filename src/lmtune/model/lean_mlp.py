"""Gated feed-forward blocks that keep two activations for the backward pass instead of four.

`down(act(gate(x)) * up(x))` (Llama, Mistral, Qwen, Gemma and most decoders
since) keeps, per token, gate(x) for act's backward, act(gate(x)) and up(x) for
the product's, and the product for down's: four tensors of the intermediate
width, the largest activations of the model. Here the gated product and the
down projection are one autograd function that keeps gate(x) and up(x) and
recomputes act(gate(x)) in the backward pass (and the product, which only a
trained down_proj's weight gradient reads: elementwise passes, a few per cent
of a step), so half of the feed-forward activations are never kept. Where
down_proj carries an adapter (LoRA) or autocast runs, only the product is
fused and down_proj's own forward keeps its input. The output and every
gradient are the same operations on the same numbers.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


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


class _GatedDown(torch.autograd.Function):
    """down(act(gate) * up) keeping gate and up only; down is a plain linear layer."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: Any, act: torch.nn.Module) -> torch.Tensor:
        ctx.act, ctx.has_bias = act, bias is not None
        ctx.save_for_backward(gate, up, weight)
        return F.linear(act(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        gate, up, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(True)
            activated = ctx.act(leaf)
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:  # a frozen down_proj (LoRA) needs no product at all
            product = activated.detach() * up
            grad_weight = flat_grad.t().matmul(product.reshape(-1, product.shape[-1]))
            del product
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = flat_grad.sum(0)
        grad_product = grad.matmul(weight)
        (grad_gate,) = torch.autograd.grad(activated, leaf, grad_product * up)
        # grad_product is this function's own: the up gradient overwrites it rather than taking new memory
        return grad_gate, grad_product.mul_(activated.detach()), grad_weight, grad_bias, None


def _lean_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        down = self.down_proj
        # A plain projection outside autocast: fused, its input recomputed (under autocast the backward's
        # matmuls would need the forward's casts; there the product alone is fused).
        if type(down) is torch.nn.Linear and not torch.is_autocast_enabled(gate.device.type):
            return _GatedDown.apply(gate, up, down.weight, down.bias, self.act_fn)
        return down(_GatedProduct.apply(gate, up, self.act_fn))
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
