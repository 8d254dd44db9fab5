"""Checkpoints that a kill cannot corrupt, and everything a resume needs.

A checkpoint folder holds the trainable weights (safetensors), the optimizer
and scheduler state, the RNG states and the loop's position. It is written to
a hidden folder and renamed into place, and it records the checksums of its
files last: a resume verifies them and falls back to the newest checkpoint
that verifies, so a cut, emptied or bit-flipped file is never trained on.
"""

from __future__ import annotations

import hashlib
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
CHECKSUMS = "checksums.json"
FILES = ("trainable.safetensors", "training_state.pt", "state.json")


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
    gathers both whole, so the checkpoint is the same for any process count). A failed write (a full disk,
    permissions) is one line naming the path and the free space; the earlier checkpoints stay as they were."""
    target = folder / f"{PREFIX}{step}"
    try:
        with staged_folder(target) as staging:
            save_file(weights, staging / "trainable.safetensors")
            training_state = {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
            }
            torch.save(training_state, staging / "training_state.pt")
            (staging / "state.json").write_text(json.dumps(loop_state, indent=2))
            (staging / CHECKSUMS).write_text(json.dumps({name: digest(staging / name) for name in FILES}, indent=2))
    except Exception as exc:  # OSError, or safetensors' and torch's own errors for a full disk
        raise CheckpointError(write_failure("checkpoint", target, exc) + "; the earlier checkpoints are kept") from None
    return target


def write_failure(what: str, path: Path, exc: BaseException) -> str:
    """One line for a write that failed: the path, the cause and the free space where it was written."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        room = f"{free / 2**20:,.1f} MiB free there"
        if free < 2**20 or "No space" in str(exc) or "unexpected pos" in str(exc):
            text = "the disk is full" if "No space" in str(exc) or free < 2**20 else f"{text} (is the disk full?)"
    except OSError:
        room = "free space unknown"
    return f"{what}: could not write {path}: {text} ({room}); free some space or set output_dir to another disk"


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(path: Path) -> Optional[str]:
    """Why the checkpoint at `path` cannot be trusted (a missing, cut or changed file), or None when it verifies."""
    try:
        recorded = json.loads((path / CHECKSUMS).read_text())
    except FileNotFoundError:
        return "it has no checksums (it was never completed)"
    except (OSError, ValueError):
        return f"its {CHECKSUMS} is damaged"
    for name in FILES:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if digest(file) != recorded.get(name):
            return f"{name} does not match its checksum (cut or changed after it was written)"
    return None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders that were completed (they hold their checksums), oldest first; not yet verified."""
    found = [p for p in folder.glob(f"{PREFIX}*") if p.name.removeprefix(PREFIX).isdigit() and (p / CHECKSUMS).exists()]
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
