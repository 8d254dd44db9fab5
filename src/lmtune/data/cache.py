"""Tokenised examples on disk, keyed by a fingerprint of data, settings and tokenizer.

Each split is one `.npz` holding, per field, all tokens in one int32 array and
the offsets of each example, so loading costs a file read, not a re-tokenisation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

DEFAULT_DIR = ".lmtune-cache"


def folder(cache_dir: Optional[str], key: str) -> Path:
    return Path(cache_dir or DEFAULT_DIR) / "data" / key


def _pack(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    if not examples:
        return arrays
    for name in examples[0]:
        lengths = np.fromiter((len(e[name]) for e in examples), dtype=np.int64, count=len(examples))
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.int32)
        for example, start, end in zip(examples, offsets[:-1], offsets[1:]):
            flat[start:end] = example[name]
        arrays[f"{name}.tokens"], arrays[f"{name}.offsets"] = flat, offsets
    return arrays


def _unpack(arrays: Any) -> list[dict[str, np.ndarray]]:
    names = sorted({key.rsplit(".", 1)[0] for key in arrays.files})
    if not names:
        return []
    columns = {name: (arrays[f"{name}.tokens"], arrays[f"{name}.offsets"]) for name in names}
    count = len(columns[names[0]][1]) - 1
    return [
        {name: tokens[offsets[i] : offsets[i + 1]] for name, (tokens, offsets) in columns.items()}
        for i in range(count)
    ]


def save(target: Path, train: list, val: list, summary: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a cache that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        np.savez(staging / "train.npz", **_pack(train))
        np.savez(staging / "val.npz", **_pack(val))
        (staging / "summary.json").write_text(json.dumps(summary))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(source: Path) -> Optional[tuple[list, list, dict[str, Any]]]:
    if not (source / "summary.json").exists():
        return None
    with np.load(source / "train.npz") as train, np.load(source / "val.npz") as val:
        return _unpack(train), _unpack(val), json.loads((source / "summary.json").read_text())
