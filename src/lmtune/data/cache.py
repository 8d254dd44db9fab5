"""Tokenised examples on disk, keyed by a fingerprint of data, settings and tokenizer.

Each split's fields are columns: all of a field's tokens in one flat file and
the offsets of each example in another. Training maps the files rather than
loading them, so a run holds only the pages it reads, and every process on a
host shares one copy through the page cache. Examples are written a chunk at a
time as they are tokenised, so building the cache holds one chunk, not the
dataset. The folder is written aside and renamed into place (atomic), and
`summary.json` records each file's size and CRC-32: a truncated or damaged
file is found on the next start and the cache is rebuilt, with a note.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

DEFAULT_DIR = ".lmtune-cache"
FLOAT_FIELDS = ("margin",)  # every other field holds token ids or labels, or (columns) the bytes of a JSON text
SPLITS = ("train", "val")


def folder(cache_dir: Optional[str], key: str) -> Path:
    return Path(cache_dir or DEFAULT_DIR) / "data" / key


def _dtype(name: str) -> Any:
    return np.float32 if name in FLOAT_FIELDS else np.int32


class Columns(Sequence):
    """A split's examples, read from the mapped files: `columns[i]` is a dict of numpy views."""

    def __init__(self, source: Path, split: str, fields: list[str]):
        self.fields = fields
        self._tokens = {f: _mapped(source / f"{split}.{f}.bin", _dtype(f)) for f in fields}
        self._offsets = {f: np.load(source / f"{split}.{f}.offsets.npy", mmap_mode="r") for f in fields}
        self._count = len(self._offsets[fields[0]]) - 1 if fields else 0

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Union[int, slice]) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        out = {}
        for name in self.fields:
            offsets = self._offsets[name]
            out[name] = self._tokens[name][int(offsets[index]) : int(offsets[index + 1])]
        return out

    def field_lengths(self, name: str) -> np.ndarray:
        """Each example's length in one field, from the offsets alone."""
        return np.diff(self._offsets[name])


def _mapped(path: Path, dtype: Any) -> np.ndarray:
    if path.stat().st_size == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def flatten(examples: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each field's values end to end, and each example's length in it (0 where an example lacks the field:
    a prompt without other columns)."""
    out = {}
    for name in dict.fromkeys(chain.from_iterable(examples)):
        lengths = np.fromiter((len(e.get(name, ())) for e in examples), dtype=np.int64, count=len(examples))
        values = np.fromiter(chain.from_iterable(e.get(name, ()) for e in examples),
                             dtype=_dtype(name), count=int(lengths.sum()))
        out[name] = (values, lengths)
    return out


class Writer:
    """Appends a split's examples, a chunk at a time, to its column files in `target`."""

    def __init__(self, target: Path, split: str):
        self.target, self.split = target, split
        self.count = 0
        self._files: dict[str, Any] = {}
        self._ends: dict[str, list[np.ndarray]] = {}  # each chunk's end offsets per field: 8 bytes an example
        self._written: dict[str, int] = {}  # values written so far per field

    @property
    def fields(self) -> list[str]:
        return list(self._files)

    def add(self, columns: Union[dict[str, tuple[np.ndarray, np.ndarray]], list[dict[str, Any]]]) -> None:
        """One chunk: for each field, its values end to end and each example's length (`flatten`), or the
        examples themselves."""
        if isinstance(columns, list):
            columns = flatten(columns)
        if not columns:
            return
        count = len(next(iter(columns.values()))[1])
        for name in columns:
            if name not in self._files:  # a field the earlier examples lack: theirs are empty
                self._files[name] = (self.target / f"{self.split}.{name}.bin").open("wb")
                self._ends[name] = [np.zeros(self.count, dtype=np.int64)]
                self._written[name] = 0
        for name, ends in self._ends.items():
            values, lengths = columns.get(name, (None, np.zeros(count, dtype=np.int64)))
            ends.append(np.cumsum(lengths, dtype=np.int64) + self._written[name])
            self._written[name] = int(ends[-1][-1])
            if values is not None and len(values):
                self._files[name].write(np.ascontiguousarray(values, dtype=_dtype(name)).tobytes())
        self.count += count

    def close(self) -> list[str]:
        for name, handle in self._files.items():
            handle.close()
            np.save(self.target / f"{self.split}.{name}.offsets.npy", np.concatenate([np.zeros(1, dtype=np.int64), *self._ends[name]]))
        return self.fields


def _crc(path: Path) -> int:
    crc, block = 0, bytearray(1 << 22)  # one buffer filled again and again: no new memory per block
    view = memoryview(block)
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(block):
            crc = zlib.crc32(view[:read], crc)
    return crc


def seal(target: Path, fields: dict[str, list[str]], summary: dict[str, Any]) -> None:
    """Write summary.json last: the fields of each split and each file's size and checksum."""
    files = {p.name: [p.stat().st_size, _crc(p)] for p in sorted(target.iterdir()) if p.suffix in (".bin", ".npy")}
    (target / "summary.json").write_text(json.dumps({"summary": summary, "fields": fields, "files": files}))


def damage(source: Path) -> Optional[str]:
    """Why the cache in `source` cannot be used (a file missing, cut short or changed), or None."""
    try:
        recorded = json.loads((source / "summary.json").read_text())
        files = recorded["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its summary.json is unreadable or from another lmtune version"
    for name, (size, _) in files.items():
        path = source / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, not the {size} written (cut short?)"
    # zlib and file reads let go of the GIL: the files are checked side by side, a core each (0.5 s to 0.25 s
    # for 2 million rows here, paid at every start)
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:
        crcs = dict(zip(files, pool.map(lambda name: _crc(source / name), files)))
    for name, (_, crc) in files.items():
        if crcs[name] != crc:
            return f"{name} does not match its checksum"
    return None


def load(source: Path, note: Any = print, checked: bool = True) -> Optional[tuple[Columns, Columns, dict[str, Any]]]:
    """The cached splits, mapped; None when there is no cache, or one that is damaged (said, and rebuilt).
    `checked=False` skips reading every file again to verify it (the caller has just sealed it)."""
    if not (source / "summary.json").exists():
        return None
    problem = damage(source) if checked else None
    if problem is not None:
        note(f"note: the tokenised-data cache {source} is damaged ({problem}); tokenising again")
        return None
    recorded = json.loads((source / "summary.json").read_text())
    splits = [Columns(source, split, recorded["fields"].get(split, [])) for split in SPLITS]
    return splits[0], splits[1], recorded["summary"]


def disk_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in source.iterdir() if p.is_file())
