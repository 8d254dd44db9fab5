"""Rotary position embeddings in training: the model's own numbers in fewer passes over the queries and keys.

transformers' `apply_rotary_pos_emb` (Llama's, copied into Mistral, Qwen2/3, Gemma, Phi-3, Granite and most
decoders since) computes `x * cos + rotate_half(x) * sin`, where rotate_half builds a new tensor
`cat(-x2, x1)` from the two halves of the head dimension. In training that is five operations on every
query and key, each recorded by autograd; and in the backward pass each half's slice puts its gradient into
a zero-filled tensor of the full size before the three contributions are added: about a dozen passes over
(tokens x heads x head dim) per layer. Here rotation is one autograd function per tensor:

    out = x * cos;  out[first half] -= x2 * sin1;  out[second half] += x1 * sin2
    dx  = g * cos;  dx[first half]  += g2 * sin2;  dx[second half]  -= g1 * sin1

with `a - b` where transformers computes `a + (-b)`, which IEEE arithmetic rounds to the same number: the output
and the gradients are bit for bit transformers' own (tested). Applied in the modeling files whose
`apply_rotary_pos_emb` and `rotate_half` are Llama's code; others (partial, interleaved or multimodal rotary)
keep theirs. Outside training (no gradient wanted) the original runs.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch


class _Rotated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].sub_(x[..., half:] * sin[..., :half])
        out[..., half:].add_(x[..., :half] * sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        # Contiguous, as autograd's sum of transformers' three contributions comes out: the layers below then
        # reduce over the same memory order, and round alike.
        grad_x = torch.mul(grad, cos, out=torch.empty(grad.shape, dtype=grad.dtype, device=grad.device))
        grad_x[..., :half].add_(grad[..., half:] * sin[..., half:])
        grad_x[..., half:].sub_(grad[..., :half] * sin[..., :half])
        return grad_x, None, None


def _fused(original: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        wanted = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        plain = q.dtype == k.dtype == cos.dtype == sin.dtype and not (cos.requires_grad or sin.requires_grad)
        if not (wanted and plain and q.shape[-1] % 2 == 0):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return _Rotated.apply(q, cos, sin), _Rotated.apply(k, cos, sin)

    apply_rotary_pos_emb.lmtune_original = original
    return apply_rotary_pos_emb


def _plain_function(named: Any) -> Any:
    """The Python function behind a modeling file's name. transformers (with the `kernels` package it depends
    on) wraps apply_rotary_pos_emb in a module that calls a hub kernel for a model kernelized with
    `use_kernels`, which lmtune never asks for, and the function itself otherwise."""
    if inspect.isfunction(named):
        return named
    forward = getattr(type(named), "forward", None) if isinstance(named, torch.nn.Module) else None
    if forward is None or not forward.__closure__:
        return None
    wrapped = inspect.getclosurevars(forward).nonlocals.get("func")
    return wrapped if inspect.isfunction(wrapped) else None


def _code(named: Any) -> tuple | None:
    """A function's code without its docstring (each modeling file words its own), None for anything else."""
    function = _plain_function(named)
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    consts = code.co_consts[1:] if code.co_consts and code.co_consts[0] == function.__doc__ else code.co_consts
    return code.co_code, consts, code.co_names


def _llama_forms() -> tuple[tuple | None, tuple | None]:
    from transformers.models.llama import modeling_llama

    apply = modeling_llama.apply_rotary_pos_emb
    return _code(getattr(apply, "lmtune_original", apply)), _code(modeling_llama.rotate_half)


def use_fused_rotary(model: torch.nn.Module) -> int:
    """Give the modeling files of this model's layers whose rotary code is Llama's the one-function rotation;
    returns how many of the model's modeling files use it. The attention looks the function up in its module
    at every call, so the module's name is rebound (once, for the whole process: the numbers are the same)."""
    apply_form, rotate_form = _llama_forms()
    if apply_form is None or rotate_form is None:
        return 0
    using = 0
    for name in sorted({type(module).__module__ for module in model.modules()}):
        source = sys.modules.get(name)
        apply = getattr(source, "apply_rotary_pos_emb", None)
        if hasattr(apply, "lmtune_original"):
            using += 1
        elif _code(apply) == apply_form and _code(getattr(source, "rotate_half", None)) == rotate_form:
            source.apply_rotary_pos_emb = _fused(apply)
            using += 1
    return using
