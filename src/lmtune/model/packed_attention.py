"""Padding-free attention for packed batches.

A packed micro batch is one row of examples back to back. Attention must stay
inside each example. A dense block-diagonal mask does that, but then SDPA
computes every (row length)^2 pair through its slow masked path, which eats
what packing saves. Here each example gets its own causal SDPA call instead:
the cost is the sum of the examples' squared lengths, on the fast causal
kernel, with no mask at all.

Registered with transformers' AttentionInterface under NAME; without packed
boundaries (evaluation, generation) it is plain SDPA with the usual mask.
With `attn_implementation: flash_attention_2` lmtune passes flash-attention's
own varlen arguments instead, and this function is not used.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

NAME = "lmtune_packed_sdpa"
_registered = False


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    packed_bounds: Optional[tuple[int, ...]] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # query: (1, heads, tokens, dim); key/value may have fewer (grouped) heads, which SDPA
    # reads in place (enable_gqa) instead of copying them out to every query head.
    grouped = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=grouped,
        )
        for start, end in zip(packed_bounds[:-1], packed_bounds[1:])
    ]
    output = torch.cat(pieces, dim=2)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def use_packed_attention(model: Any) -> str:
    """Switch a model to padding-free attention for packed batches; returns the implementation in use."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == "flash_attention_2":
        return current  # its varlen kernels take cu_seq_lens directly
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    return NAME


def packed_kwargs(bounds: torch.Tensor, implementation: Optional[str]) -> dict[str, Any]:
    """Keyword arguments that tell the attention where each packed example starts."""
    if implementation == "flash_attention_2":
        cu = bounds.to(torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return {"packed_bounds": tuple(int(b) for b in bounds.tolist())}
