"""Losses on micro batches, below both the stages and the engine: next-token losses on the trained positions
only, in chunks; per-sequence log-probabilities; the rows of each sequence's last token.

Full `batch x sequence x vocab` fp32 logits dominate memory for large
vocabularies; here the output head runs only on positions whose label is
trained, a chunk at a time, and each chunk's logits are recomputed in the
backward pass instead of being kept.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data.batches import IGNORE, attention_inputs
from .model.last_block import feed_forward_only_at
from .model.sharded import is_sharded

CHUNK = 1024


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits over the sampling temperature; at 1 the same tensor (no copy of a batch x vocab block)."""
    return logits if temperature == 1.0 else logits / temperature


def _chunk_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.cross_entropy(_tempered(head(hidden).float(), temperature), targets, reduction="none")


def trained_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def uses_plain_head(model: torch.nn.Module) -> bool:
    """Whether the head may run apart from the model's forward. Models that scale or cap their logits need
    their own forward; so does a model sharded with FSDP2, whose root gathers the embeddings, final norm and
    head (possibly one tied tensor) only around the model's own forward."""
    config = model.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) or is_sharded(model))


def rows_read(keep: torch.Tensor) -> torch.Tensor | None:
    """Rows of the (batch x positions) grid whose final hidden state the loss reads; None when nearly all
    are (pt), where skipping the rest would not pay for gathering them."""
    if keep.float().mean() > 0.9:
        return None
    return F.pad(keep, (0, 1)).reshape(-1).nonzero().squeeze(1)


def token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0, router: Optional[list] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy of each trained position, the trained-position mask over labels[:, 1:]);
    `temperature` divides the logits first (the distribution an RL stage sampled from). With a `router` list,
    a mixture-of-experts model's router logits are appended to it (for its load-balancing loss)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    inputs = attention_inputs(batch, getattr(model.config, "_attn_implementation", None))
    if router is not None:
        inputs["output_router_logits"] = True
    if not uses_plain_head(model):
        out = model(**inputs, use_cache=False)
        if router is not None:
            router.append(out.router_logits)
        logits = _tempered(out.logits[:, :-1].float(), temperature)
        return F.cross_entropy(logits[keep], targets[keep], reduction="none"), keep
    hidden = _trained_hidden(model, inputs, keep, router)
    return _head_losses(model, hidden, targets[keep], temperature), keep


def _trained_hidden(model: torch.nn.Module, inputs: dict[str, Any], keep: torch.Tensor, router: Optional[list]) -> torch.Tensor:
    """The decoder's final hidden states at the trained positions (the last block's feed-forward run there only)."""
    decoder = model.get_decoder()
    with feed_forward_only_at(decoder, rows_read(keep) if router is None else None):
        out = decoder(**inputs, use_cache=False)
    if router is not None:
        router.append(out.router_logits)
    return out.last_hidden_state[:, :-1][keep]


def _head_losses(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the output head on (rows of final hidden states, their targets), a chunk at a time."""
    head = model.get_output_embeddings()
    parts = []
    for start in range(0, hidden.shape[0], CHUNK):
        part, goal = hidden[start : start + CHUNK], targets[start : start + CHUNK]
        if torch.is_grad_enabled() and part.requires_grad:
            parts.append(checkpoint(_chunk_losses, head, part, goal, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_losses(head, part, goal, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def listed_target_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each listed target (`target_ids`) from the row that predicts it (`target_rows`):
    batches where a token is not always predicted by the row before it (pairs sharing their prompt)."""
    rows, targets = batch["target_rows"], batch["target_ids"]
    inputs = attention_inputs(batch, getattr(model.config, "_attn_implementation", None))
    if not uses_plain_head(model):
        logits = model(**inputs, use_cache=False).logits.reshape(-1, model.config.vocab_size).index_select(0, rows)
        return F.cross_entropy(_tempered(logits.float(), temperature), targets, reduction="none")
    decoder = model.get_decoder()
    with feed_forward_only_at(decoder, torch.unique(rows)):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
    return _head_losses(model, hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), targets, temperature)


def summed_token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (divide by the token count yourself)."""
    head = model.get_output_embeddings()
    if not (uses_plain_head(model) and type(head) is torch.nn.Linear and head.bias is None):
        return token_losses(model, batch)[0].sum()
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    hidden = _trained_hidden(model, attention_inputs(batch, getattr(model.config, "_attn_implementation", None)), keep, None)
    wanted = torch.is_grad_enabled()
    return _SummedHeadLoss.apply(hidden, head.weight, targets[keep], wanted and hidden.requires_grad,
                                 wanted and head.weight.requires_grad)


class _SummedHeadLoss(torch.autograd.Function):
    """The output head's summed cross-entropy with its gradients computed in the forward, a chunk at a time.

    A sum's gradient reaches every token alike (a scale known only in the backward), so each chunk's
    d loss / d logits = softmax - one-hot can be turned into the hidden states' and the head's gradients as
    soon as its logits exist: no chunk's logits are kept, and none is computed twice (the checkpointed chunks
    of `_head_losses` compute every chunk's logits again in the backward)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, for_hidden: bool,
                for_weight: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if for_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if for_weight else None
        for start in range(0, hidden.shape[0], CHUNK):
            part, goal = hidden[start : start + CHUNK], targets[start : start + CHUNK]
            logits = F.linear(part, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, goal[:, None]).squeeze(1)).sum()
            if not (for_hidden or for_weight):
                continue
            slope = torch.exp(logits.sub_(lse[:, None]))  # softmax, in the logits' storage
            slope[torch.arange(len(goal), device=goal.device), goal] -= 1.0
            if for_hidden:
                grad_hidden[start : start + CHUNK] = slope.to(part.dtype) @ weight.to(part.dtype)
            if for_weight:
                grad_weight.addmm_(slope.t(), part.float())
        ctx.grads = (grad_hidden, grad_weight)  # not inputs or outputs: kept as they are until the backward
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = (None, None)
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _sequence_of_positions(batch: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Which sequence of the batch each position (batch x positions grid) belongs to."""
    if "cu_seq_lens" in batch:
        bounds = batch["cu_seq_lens"].to(batch["input_ids"].device)
        positions = torch.arange(shape[1], device=bounds.device)
        return torch.bucketize(positions, bounds[1:], right=True)[None].expand(shape)
    return torch.arange(shape[0], device=batch["input_ids"].device)[:, None].expand(shape)


def sequences_in(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["cu_seq_lens"]) - 1 if "cu_seq_lens" in batch else batch["input_ids"].shape[0]


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens, how many there are), one entry per sequence."""
    if "target_rows" in batch:
        losses, sequence = listed_target_losses(model, batch), batch["target_sequences"]
        count = 2 * len(batch["prompt_branches"])
        sums = losses.new_zeros(count).index_add(0, sequence, -losses)
        return sums, torch.bincount(sequence, minlength=count)
    losses, keep = token_losses(model, batch)
    sequence = _sequence_of_positions(batch, batch["labels"].shape)[:, 1:][keep]
    count = sequences_in(batch)
    sums = losses.new_zeros(count).index_add(0, sequence, -losses)
    tokens = torch.zeros(count, dtype=torch.long, device=sequence.device).index_add(0, sequence, torch.ones_like(sequence))
    return sums, tokens


def last_token_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The row (of the flattened batch x positions grid) of each sequence's last real token."""
    if "cu_seq_lens" in batch:
        return batch["cu_seq_lens"][1:].to(batch["input_ids"].device) - 1
    mask = batch["attention_mask"]
    return torch.arange(mask.shape[0], device=mask.device) * mask.shape[1] + mask.sum(1) - 1
