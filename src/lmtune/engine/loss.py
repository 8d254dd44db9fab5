"""Causal LM loss on the trained positions only, in chunks.

Full `batch x sequence x vocab` fp32 logits dominate memory for large
vocabularies; here the output head runs only on positions whose label is
trained, a chunk at a time, and each chunk's logits are recomputed in the
backward pass instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.batches import IGNORE, attention_inputs
from ..model.last_block import feed_forward_only_at

CHUNK = 1024


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def _uses_plain_head(model: torch.nn.Module) -> bool:
    """Models that scale or cap their logits need their own forward."""
    config = model.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (divide by the token count yourself)."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    inputs = attention_inputs(batch, getattr(model.config, "_attn_implementation", None))
    if not _uses_plain_head(model):
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    decoder = model.get_decoder()
    # Rows of the (batch x positions) grid whose final hidden state the loss reads.
    read = torch.nn.functional.pad(keep, (0, 1)).reshape(-1).nonzero().squeeze(1)
    with feed_forward_only_at(decoder, read):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
    hidden, targets = hidden[keep], targets[keep]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK):
        part, goal = hidden[start : start + CHUNK], targets[start : start + CHUNK]
        if torch.is_grad_enabled() and part.requires_grad:
            total = total + checkpoint(_chunk_loss, head, part, goal, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, part, goal)
    return total
