"""The last decoder block's feed-forward, computed only on the rows the loss reads.

A causal LM's loss reads the final hidden state at trained positions only (the
answers, in sft). Every earlier block must run on every position, since later
positions attend to them; but the last block's feed-forward feeds nothing but
the final hidden state, so at untrained positions its result is never read.
On the prompt half of an sft batch that is about a twelfth of an 8-layer
model's compute. The loss and every gradient are unchanged: the skipped rows
are left at zero and never reach the loss.

Skipped under gradient checkpointing, whose recomputation must see the same
shapes as the first pass.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch


def _rows_forward(self: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    rows = self._lmtune_rows
    if rows is None or args or kwargs:
        return type(self).forward(self, hidden, *args, **kwargs)
    flat = hidden.reshape(-1, hidden.shape[-1])
    # As one sequence of the picked rows: mixture-of-experts blocks read (batch, positions, hidden); each token is
    # routed on its own, so the picked rows give what they give in the whole batch.
    picked = type(self).forward(self, flat.index_select(0, rows)[None]).reshape(len(rows), -1)
    out = picked.new_zeros(flat.shape[0], picked.shape[-1]).index_copy(0, rows, picked)
    return out.view(*hidden.shape[:-1], picked.shape[-1])


def _last_feed_forward(decoder: torch.nn.Module) -> Optional[torch.nn.Module]:
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    mlp = getattr(layers[-1], "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) else None


@contextmanager
def feed_forward_only_at(decoder: torch.nn.Module, rows: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, the decoder's last feed-forward runs only on `rows` (indices into batch x positions)."""
    mlp = _last_feed_forward(decoder)
    if rows is None or mlp is None or getattr(decoder, "gradient_checkpointing", False):
        yield
        return
    if "forward" not in vars(mlp):
        mlp.forward = types.MethodType(_rows_forward, mlp)
    mlp._lmtune_rows = rows
    try:
        yield
    finally:
        mlp._lmtune_rows = None
