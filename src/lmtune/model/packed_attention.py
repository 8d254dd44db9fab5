"""Padding-free attention for packed batches, exact for each architecture or refused.

A packed micro batch is one row of examples back to back. Attention must stay
inside each example. A dense block-diagonal mask does that, but then SDPA
computes every (row length)^2 pair through its slow masked path, which eats
what packing saves. Here each example gets its own attention call instead: the
cost is the sum of the examples' squared lengths, on the fast causal kernel
whenever the model's attention is plain causal attention.

What the model's own attention does, the per-example call does too:
- a sliding window (Mistral, Phi-3, Qwen2, Gemma 2/3 local layers) shorter than
  the example becomes a banded causal mask on that example alone;
- soft-capped scores (Gemma 2) are computed as the model's eager attention
  computes them, per example;
- anything else the model passes to its attention (attention sinks, position
  biases) is not computed here, so such a model is refused rather than trained
  on different mathematics.

Registered with transformers' AttentionInterface; without packed boundaries
(evaluation of padded batches, generation) it hands over to the model's own
implementation (SDPA, or eager for models that need it), with its own mask.
With `attn_implementation: flash_attention_2` lmtune passes flash-attention's
varlen arguments instead, and this module is not used.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import UserError

# Names must not contain "sdpa", "flash" or "flex": transformers vets those as its own kernels.
NAME = "lmtune_packed"  # falls back to SDPA
EAGER_NAME = "lmtune_packed_eager"  # falls back to the model's eager attention (soft-capping models)
_registered = False

# Arguments transformers passes to every attention function that change nothing about the mathematics.
_HARMLESS = {"position_ids", "cache_position", "output_attentions", "use_cache", "is_causal", "layer_idx", "past_key_values"}
# Arguments whose value `None` (or 0) means "not used"; any other value is mathematics we do not compute.
_UNSUPPORTED = ("s_aux", "sinks", "position_bias", "alibi", "head_mask", "attention_chunk_size")


class PackingNotExact(UserError, ValueError):
    """Packed attention would compute something other than the model's own attention."""


def packing_obstacle(config: Any) -> Optional[str]:
    """Why packed attention cannot be exact for a model with this config, or None when it can."""
    model_type = getattr(config, "model_type", "this model")
    if getattr(config, "use_bidirectional_attention", False):
        return f"{model_type} with use_bidirectional_attention attends both ways; packing assumes causal attention"
    if getattr(config, "attention_chunk_size", None):
        return f"{model_type} uses chunked attention (attention_chunk_size), which packed attention does not compute"
    if getattr(config, "alibi", False) or model_type in ("bloom", "mpt"):
        return f"{model_type} adds ALiBi position biases to its attention scores, which packed attention does not compute"
    if model_type in ("gpt_oss",):
        return f"{model_type} uses attention sinks, which packed attention does not compute"
    return None


def _window_mask(queries: int, keys: int, window: Optional[int], device: torch.device) -> torch.Tensor:
    """True where query i may see key j: causal, and within the window when there is one. With fewer queries
    than keys, the queries are the last positions (a rejected answer after its prompt)."""
    query = torch.arange(keys - queries, keys, device=device)[:, None]
    key = torch.arange(keys, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window  # transformers' sliding_window_overlay
    return allowed


def _one_example(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scaling: Optional[float],
    dropout: float,
    window: Optional[int],
    softcap: Optional[float],
    grouped: bool,
) -> torch.Tensor:
    queries, keys = query.shape[2], key.shape[2]
    windowed = window is not None and keys > window
    if softcap is None:
        mask = _window_mask(queries, keys, window, query.device) if (windowed or queries != keys) else None
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scaling, enable_gqa=grouped
        )
    # Soft-capped scores exist only in eager attention; computed here exactly as the model's eager path does.
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~_window_mask(queries, keys, window if windowed else None, query.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


def _check_arguments(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise PackingNotExact(
                f"packing: {type(module).__name__} passes `{name}` to its attention, which packed attention does not "
                "compute; set packing: false"
            )
    if getattr(module, "is_causal", True) is False:
        raise PackingNotExact(f"packing: {type(module).__name__} is not causal attention; set packing: false")


def _packed(
    fallback: Callable[..., tuple[torch.Tensor, Any]],
) -> Callable[..., tuple[torch.Tensor, Any]]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        sliding_window: Optional[int] = None,
        softcap: Optional[float] = None,
        packed_bounds: Optional[tuple[int, ...]] = None,
        packed_branches: Optional[tuple[tuple[int, int], ...]] = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if packed_bounds is None:
            return fallback(
                module, query, key, value, attention_mask,
                dropout=dropout, scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs,
            )
        _check_arguments(module, kwargs)
        # query: (1, heads, tokens, dim); key/value may have fewer (grouped) heads, which SDPA
        # reads in place (enable_gqa) instead of copying them out to every query head.
        grouped = query.shape[1] != key.shape[1]
        # split (not slicing) so the backward pass joins the pieces' gradients in one tensor, instead of
        # padding each piece's gradient out to the whole row with zeros and adding them up.
        lengths = [end - start for start, end in zip(packed_bounds[:-1], packed_bounds[1:])]
        options = dict(scaling=scaling, dropout=dropout, window=sliding_window, softcap=softcap, grouped=grouped)
        pieces = []
        for index, (q, k, v) in enumerate(zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))):
            if packed_branches is None:
                pieces.append(_one_example(q, k, v, **options))
                continue
            # The prompt and its first answer as one causal sequence; each later answer sees the prompt and itself.
            prompt, *starts = (b for b in packed_branches[index] if b >= 0)
            sizes = [b - a for a, b in zip([0, *starts], [*starts, q.shape[2]])]
            (q1, *qs), (k1, *ks), (v1, *vs) = (t.split(sizes, 2) for t in (q, k, v))
            pieces.append(_one_example(q1, k1, v1, **options))
            for q2, k2, v2 in zip(qs, ks, vs):
                pieces.append(_one_example(q2, torch.cat([k1[:, :, :prompt], k2], 2), torch.cat([v1[:, :, :prompt], v2], 2), **options))
        # (1, tokens, heads, dim), contiguous straight out of cat: no separate transpose copy.
        return torch.cat([piece.transpose(1, 2) for piece in pieces], dim=1), None

    return attention


def _sdpa_fallback(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_fallback(module, query, key, value, attention_mask, **kwargs):
    # The model's own eager attention lives beside its class in its modeling file.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    return eager(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(NAME, _packed(_sdpa_fallback))
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(EAGER_NAME, _packed(_eager_fallback))
    AttentionMaskInterface.register(EAGER_NAME, eager_mask)
    _registered = True


def use_packed_attention(model: Any) -> str:
    """Switch a model to padding-free attention for packed batches; returns the implementation in use.

    Raises PackingNotExact when packed attention could not compute the model's own attention.
    """
    obstacle = packing_obstacle(model.config)
    if obstacle:
        raise PackingNotExact(f"packing: {obstacle}; set packing: false")
    current = getattr(model.config, "_attn_implementation", None)
    if current and current.startswith("flash_attention"):
        return current  # its varlen kernels take cu_seq_lens, windows and soft-capping directly
    if current in (NAME, EAGER_NAME):
        return current
    if not getattr(model, "_supports_attention_backend", False):
        raise PackingNotExact(
            f"packing: {type(model).__name__} does not take a custom attention function in this transformers "
            "version, so examples cannot be kept apart; set packing: false"
        )
    register()
    name = EAGER_NAME if current == "eager" else NAME
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    return name


def packed_kwargs(bounds: torch.Tensor, implementation: Optional[str], branches: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Keyword arguments that tell the attention where each packed example starts (and, for answers sharing their
    prompt, where each prompt ends and each later answer starts: a row of `branches`, padded with -1)."""
    if branches is not None:
        if implementation not in (NAME, EAGER_NAME):
            raise PackingNotExact(f"packing: answers sharing their prompt need lmtune's packed attention, not {implementation}")
        return {"packed_bounds": tuple(int(b) for b in bounds.tolist()), "packed_branches": tuple(map(tuple, branches.tolist()))}
    if implementation and implementation.startswith("flash_attention"):
        cu = bounds.to(torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max())
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return {"packed_bounds": tuple(int(b) for b in bounds.tolist())}


def switch_to_packed(model: Any, setting: Optional[bool]) -> tuple[bool, Optional[str]]:
    """Packed batches for this model? (on, a note for the user when the default had to be turned off).

    `setting` is the config's `packing`: False never packs, True insists (PackingNotExact
    where it cannot be exact), None packs wherever it is exact.
    """
    if setting is False:
        return False, None
    try:
        use_packed_attention(model)
    except PackingNotExact as exc:
        if setting:
            raise
        return False, f"{exc} (padded batches are used instead)".removeprefix("packing: ")
    return True, None


def switch_to_packed_rows(model: Any) -> None:
    """pack_to_length: rows of several examples need the per-example attention; where it is not exact, say so."""
    try:
        use_packed_attention(model)
    except PackingNotExact as exc:
        reason = str(exc).removeprefix("packing: ").rsplit("; set packing: false", 1)[0]
        raise PackingNotExact(f"pack_to_length: {reason}; set pack_to_length: false") from None


def shares_prompts(model: Any) -> bool:
    """Whether answers (a preference pair, a grpo group) may share their prompt in one packed segment: lmtune's own packed attention
    computes the branch exactly (flash attention's varlen kernels take no such layout)."""
    return getattr(model.config, "_attn_implementation", None) in (NAME, EAGER_NAME)
