"""FSDP2's names across torch versions, and whether a model is sharded (no process group: never)."""

from __future__ import annotations

from typing import Any

import torch


def fsdp2() -> tuple[Any, Any, Any, Any]:
    """(fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy)."""
    try:  # public from torch 2.6; 2.5 keeps it under _composable
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # pragma: no cover - torch 2.5
        from torch.distributed._composable.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
    return fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy


def is_sharded(model: Any) -> bool:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return isinstance(model, fsdp2()[1])
