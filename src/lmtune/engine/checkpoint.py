"""Checkpoints that a kill cannot corrupt, and everything a resume needs.

A checkpoint folder holds the trainable weights (safetensors), the optimizer
and scheduler state, the RNG states and the loop's position. It is written to
a hidden folder and renamed into place, so the newest complete checkpoint is
always a good one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..staged_folder import staged_folder

PREFIX = "checkpoint-"


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the configured model and method."""


def _numpy_state() -> list[Any]:
    """numpy's RNG state in types `torch.load(weights_only=True)` accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    folder: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    loop_state: dict[str, Any],
    scaler: Optional[Any] = None,
) -> Path:
    """`weights`: the trainable tensors by name; `optimizer_state`: keyed by parameter name (engine/distributed.py
    gathers both whole, so the checkpoint is the same for any process count)."""
    target = folder / f"{PREFIX}{step}"
    with staged_folder(target) as staging:
        save_file(weights, staging / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
            },
            staging / "training_state.pt",
        )
        (staging / "state.json").write_text(json.dumps(loop_state, indent=2))
    return target


def complete_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob(f"{PREFIX}*") if (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest(folder: Path) -> Optional[Path]:
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def prune(folder: Path, keep: int, protect: Optional[str] = None) -> None:
    """Keep the newest `keep` checkpoints, and the protected (best) one."""
    found = complete_checkpoints(folder)
    for path in found[:-keep] if keep > 0 else found:
        if protect and path.name == Path(protect).name:
            continue
        shutil.rmtree(path, ignore_errors=True)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """A checkpoint's trainable weights into a model built with the same model and method (sharded or not)."""
    from .distributed import load_full_weights

    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise CheckpointError(
            f"checkpoint: {path} does not match this config's model and method (it holds {missing[0]}, which the model lacks)"
        )
    load_full_weights(model, weights)


def load(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Optional[Any] = None
) -> dict[str, Any]:
    load_weights(path, model)
    # weights_only: a checkpoint handed over by someone else cannot run code when loaded.
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    from .distributed import load_full_optimizer_state

    load_full_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"])
    return json.loads((path / "state.json").read_text())
