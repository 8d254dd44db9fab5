"""LoRA layers' training forward: no stored copy of the dropped input, fewer passes over activations.

peft computes `result + lora_B(lora_A(dropout(x))) * scaling`. Two things cost
more than they need to on the activations (tokens x features) of every adapted
layer:

- For the weight gradient of lora_A, autograd keeps the dropped input: a
  full-precision copy of x for every adapted layer (q, k and v each keep their
  own, though they read the same x), plus dropout's mask. Here dropout and
  lora_A are one autograd function that keeps x (which the frozen base layer
  keeps anyway) and which elements were dropped, and rebuilds the dropped
  input in the backward pass.
- `* scaling` and `result +` are two elementwise passes over the layer's
  output, forward and backward. Here the scaling multiplies the r-wide
  adapter activation instead, and the addition happens inside the matrix
  product of lora_B (addmm).

The mathematics are peft's: each element of each adapter's input is kept with
probability 1 - p and scaled by 1 / (1 - p), independently per element and per
adapted layer; the output and gradients are the same products, summed in
another order. On CPU the draw costs p random numbers per element instead of
one, and the dropped elements are kept as indices, not a mask (see
_rare_places and zero_dropped). The random stream differs from
torch.nn.Dropout's, so runs are reproducible with lmtune's seed but not
bit-equal to peft's with dropout on.
Layers peft would treat specially (several or disabled adapters, DoRA and other
variants, merged weights, quantised bases) keep peft's own forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def _rare_places(count: int, rare: float) -> torch.Tensor:
    """Flat indices (sorted) of the elements where an outcome of probability `rare` happens, each element
    independently. The gaps between occurrences are independent geometric draws, so the Bernoulli process
    costs about `rare` draws per element instead of one (torch's CPU generator is serial). Each gap is
    floor(log(U) / log(1 - rare)) + 1 for U uniform on (0, 1], the inverse of the geometric distribution
    function, computed in one vectorised pass (Tensor.geometric_ takes a scalar logarithm per draw)."""
    expected = count * rare
    batch = int(expected + 6 * (expected * (1 - rare)) ** 0.5 + 16)
    per_gap = 1.0 / math.log1p(-rare)

    def gaps() -> torch.Tensor:
        uniform = torch.rand(batch, dtype=torch.float64)
        return uniform.neg_().add_(1.0).log_().mul_(per_gap).floor_().add_(1.0).cumsum_(0)  # -U + 1 is 1 - U exactly

    places = gaps()
    while places[-1] < count:  # more occurrences than the generous first batch held: rare
        places = torch.cat([places, gaps() + places[-1]])
    # Every gap is at least 1, so the places rise strictly: those within the tensor are a prefix (no mask pass).
    within = int(torch.searchsorted(places, float(count), right=True))
    return places[:within].long() - 1


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Each element kept with probability 1 - p, independently (True = kept)."""
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    count = shape.numel()
    dropped_is_rare = p <= 0.5
    mask = torch.full((count,), dropped_is_rare, dtype=torch.bool)
    mask[_rare_places(count, min(p, 1.0 - p))] = not dropped_is_rare
    return mask.view(shape)


def draw_dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """Which elements of x dropout drops: on CPU at p <= 0.5 their flat indices (the same draw keep_mask
    makes), elsewhere a boolean mask of the kept ones."""
    if x.device.type == "cpu" and p <= 0.5:
        return _rare_places(x.numel(), p)
    return keep_mask(x.shape, p, x.device)


def zero_dropped(t: torch.Tensor, dropped: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """t with the dropped elements set to zero (`dropped` from draw_dropped). With flat indices this is a copy
    and a fill of about p of the elements: a quarter of the time of multiplying by a mask, which converts the
    mask to floats first."""
    if dropped.dtype == torch.bool:
        return t.mul_(dropped) if in_place else t * dropped
    out = t if in_place and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
    out.view(-1).index_fill_(0, dropped, 0)
    return out


class _DropoutLinear(torch.autograd.Function):
    """F.linear(dropout(x), weight) that keeps x and which elements were dropped, not the dropped copy of x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        dropped = draw_dropped(x, p)
        scale = 1.0 / (1.0 - p)
        # The 1 / (1 - p) scale is applied to the r-wide output, not the input: the same product, fewer multiplies.
        out = F.linear(zero_dropped(x, dropped), weight) * scale
        ctx.save_for_backward(x, weight, dropped)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, Any, None]:
        x, weight, dropped = ctx.saved_tensors
        # Under autocast the forward matmul ran in grad_out's dtype; the gradients do too, then take their inputs' dtypes.
        compute = grad_out.dtype
        grad = grad_out * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = zero_dropped(grad @ weight.to(compute), dropped, in_place=True).to(x.dtype)
        if ctx.needs_input_grad[1]:
            kept = zero_dropped(x.to(compute), dropped).reshape(-1, x.shape[-1])
            grad_weight = (grad.reshape(-1, grad.shape[-1]).t() @ kept).to(weight.dtype)
        return grad_x, grad_weight, None


class DropoutLoraA(torch.nn.Linear):
    """peft's lora_A with its dropout inside; same parameters, same state-dict keys."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_p > 0 and torch.is_grad_enabled():
            return _DropoutLinear.apply(x, self.weight, self.dropout_p)
        return F.linear(x, self.weight, self.bias)


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's Linear forward for one plain active adapter, with scaling and addition folded into matmuls."""
    names = self.active_adapters
    plain = (
        not args and not kwargs and not self.disable_adapters and not self.merged
        and len(names) == 1 and names[0] in self.lora_A and not self.lora_variant
        and isinstance(self.lora_dropout[names[0]], torch.nn.Identity)
    )
    if plain:
        name = names[0]
        result = self.base_layer(x)
        weight = self.lora_B[name].weight
        if torch.is_autocast_enabled(x.device.type) or result.dtype == weight.dtype:
            hidden = self.lora_A[name](x.to(weight.dtype)) * self.scaling[name]  # r wide: a cheap multiply
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]).to(result.dtype), weight.t().to(result.dtype))
            return flat.view(result.shape)
    return type(self).forward(self, x, *args, **kwargs)  # peft's own (mixed dtypes without autocast included)


def _fuse_dropout(layer: Any) -> None:
    """Move each adapter's dropout into its lora_A (see _DropoutLinear)."""
    if layer.lora_variant:  # DoRA and other variants read the dropped input themselves
        return
    for name, dropout in layer.lora_dropout.items():
        lora_a = layer.lora_A[name] if name in layer.lora_A else None
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and type(lora_a) is torch.nn.Linear and lora_a.bias is None:
            lora_a.__class__ = DropoutLoraA
            lora_a.dropout_p = float(dropout.p)
            layer.lora_dropout[name] = torch.nn.Identity()


def use_lean_lora(model: torch.nn.Module) -> int:
    """Fused dropout in every LoRA layer, and the lean forward in plain linear ones; returns how many got it."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    lean = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            continue
        _fuse_dropout(module)
        if type(module) is LoraLinear and all(b.bias is None for b in module.lora_B.values()):
            module.forward = types.MethodType(_lean_forward, module)
            lean += 1
    return lean
