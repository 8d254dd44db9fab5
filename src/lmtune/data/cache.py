"""Tokenised examples on disk, keyed by a fingerprint of data, settings and tokenizer.

Each split is one `.npz` holding, per field, all tokens in one int32 array and
the offsets of each example, so loading costs a file read, not a re-tokenisation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..staged_folder import staged_folder

DEFAULT_DIR = ".lmtune-cache"
FLOAT_FIELDS = ("margin",)  # every other field holds token ids or labels, or (columns) the bytes of a JSON text


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
        flat = np.empty(int(offsets[-1]), dtype=np.float32 if name in FLOAT_FIELDS else np.int32)
        for example, start, end in zip(examples, offsets[:-1], offsets[1:]):
            flat[start:end] = example[name]
        arrays[f"{name}.tokens"], arrays[f"{name}.offsets"] = flat, offsets
    return arrays


def _unpack(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    names = sorted({key.rsplit(".", 1)[0] for key in arrays})
    if not names:
        return []
    columns = {name: (arrays[f"{name}.tokens"], arrays[f"{name}.offsets"]) for name in names}
    count = len(columns[names[0]][1]) - 1
    return [
        {name: tokens[offsets[i] : offsets[i + 1]] for name, (tokens, offsets) in columns.items()}
        for i in range(count)
    ]


def save(target: Path, train: list, val: list, summary: dict[str, Any]) -> tuple[list, list]:
    """Write atomically; returns the examples in the form `load` gives them, so a
    run that builds the cache trains on exactly what a later run reads."""
    packed_train, packed_val = _pack(train), _pack(val)
    with staged_folder(target) as staging:
        np.savez(staging / "train.npz", **packed_train)
        np.savez(staging / "val.npz", **packed_val)
        (staging / "summary.json").write_text(json.dumps(summary))
    return _unpack(packed_train), _unpack(packed_val)


def load(source: Path) -> Optional[tuple[list, list, dict[str, Any]]]:
    if not (source / "summary.json").exists():
        return None
    with np.load(source / "train.npz") as train, np.load(source / "val.npz") as val:
        return _unpack(train), _unpack(val), json.loads((source / "summary.json").read_text())
