"""A dataset entry's rows, addressable by position, so any process can read any chunk of them.

The main process indexes each entry once; a chunk of positions then becomes a
small payload that a tokenising worker turns back into rows. A JSON-lines file
is indexed by the byte offsets of its lines (a newline scan in numpy, 12 bytes
per row): its rows are parsed only in the worker that tokenises them, so no
process holds the dataset. Arrow data (parquet, hub datasets, `save_to_disk`
folders) is memory-mapped and read by position. A JSON array, CSV or text
file has to be parsed whole: its rows are held, which suits the sizes those
formats come in (docs/data.md says to give millions of rows as JSON lines).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .records import TOO_DEEP, DataError, Row, _locate, _saved_dataset, data_files, load_hub, read_file

BLOCK = 1 << 23  # bytes scanned for newlines at a time: the index, not the file, is what stays in memory
BOM = b"\xef\xbb\xbf"


class JsonLines:
    """Rows of a JSON-lines file: the byte span and line number of each non-blank line."""

    def __init__(self, path: Path):
        self.path = path.resolve()
        stat = self.path.stat()
        self.version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)  # a file rewritten in place is mapped afresh
        self.starts, self.ends, self.lines = _line_index(self.path)

    def __len__(self) -> int:
        return len(self.starts)

    def payload(self, positions: np.ndarray) -> tuple:
        return ("lines", (str(self.path), self.version), self.starts[positions], self.ends[positions], self.lines[positions])


class HeldRows:
    """Rows parsed whole in the main process (a JSON array, CSV or text file)."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def payload(self, positions: np.ndarray) -> tuple:
        return ("rows", [self.rows[int(i)] for i in positions])


class ArrowRows:
    """Rows of a memory-mapped Arrow table, read by position."""

    def __init__(self, table: Any, name: str):
        self.table, self.name = table, name

    def __len__(self) -> int:
        return self.table.num_rows

    def payload(self, positions: np.ndarray) -> tuple:
        values = self.table.take(positions).to_pylist()
        return ("rows", [Row(v, f"{self.name} row {int(i) + 1}") for v, i in zip(values, positions)])


def _line_index(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of each non-blank line, read a block at a time (never the file at once)."""
    starts, ends, lines = [], [], []
    offset, counted, carry = 0, 0, b""  # the file offset of carry's first byte; lines before it
    with path.open("rb") as handle:
        while True:
            block = handle.read(BLOCK)
            if offset == 0 and not carry and block.startswith(BOM):  # Excel and Notepad write one: read past it
                block, offset = block[len(BOM):], len(BOM)
            buffer, last = carry + block, not block
            if last and not buffer:
                break
            data = np.frombuffer(buffer, dtype=np.uint8)
            breaks = np.flatnonzero(data == 10)
            if last:
                begin, end, cut = np.concatenate([[0], breaks + 1]), np.concatenate([breaks, [len(data)]]), len(data)
            elif breaks.size:
                begin, end, cut = np.concatenate([[0], breaks[:-1] + 1]), breaks, int(breaks[-1]) + 1
            else:  # one line longer than the block: read on
                carry = buffer
                continue
            end = end - ((end > begin) & (data[np.maximum(end - 1, 0)] == 13))  # Windows line ends
            keep = end > begin
            short = np.flatnonzero(keep & ((end - begin) < 16))  # blank lines are short: look at those alone
            keep[[i for i in short.tolist() if not buffer[begin[i] : end[i]].strip()]] = False
            starts.append((begin[keep] + offset).astype(np.int64))
            ends.append((end[keep] + offset).astype(np.int64))
            lines.append(np.flatnonzero(keep).astype(np.int32) + counted + 1)
            counted += len(begin)
            carry, offset = buffer[cut:], offset + cut
            if last:
                break
    if not starts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(lines)


_OPEN: dict[Any, int] = {}  # in a worker: each JSON-lines file opened once


def rows_of(payload: tuple) -> Iterator[Row]:
    """The rows a payload names (in the process that tokenises them)."""
    if payload[0] == "rows":
        yield from payload[1]
        return
    _, key, starts, ends, lines = payload
    name = key[0]
    handle = _OPEN.get(key)
    if handle is None:
        handle = _OPEN[key] = os.open(name, os.O_RDONLY)
    # Read with pread, not a mapping: the file's pages then stay in the page cache and out of this process's memory.
    low, high = (int(starts.min()), int(ends.max())) if len(starts) else (0, 0)
    whole = high - low <= 2 * int((ends - starts).sum()) + (1 << 16)  # a run of nearby lines: one read for all
    span = os.pread(handle, high - low, low) if whole else b""
    short = Path(name).name
    for start, end, number in zip(starts.tolist(), ends.tolist(), lines.tolist()):
        raw = span[start - low : end - low] if whole else os.pread(handle, end - start, start)
        try:
            value = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise DataError(f"{name} line {number}: not UTF-8 text (byte {start + exc.start}: "
                            f"{raw[exc.start:exc.start + 1]!r}); re-save the file as UTF-8") from None
        except json.JSONDecodeError as exc:
            if not raw.strip():
                continue
            raise DataError(f"{name} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); fix that line") from None
        except RecursionError:
            raise DataError(f"{name} line {number}: {TOO_DEEP}") from None
        if not isinstance(value, dict):
            raise DataError(f"{name} line {number}: expected a JSON object per line, got {type(value).__name__}")
        yield Row(value, f"{short} line {number}")


def close_files() -> None:
    for handle in _OPEN.values():
        os.close(handle)
    _OPEN.clear()


def open_sources(location: str, base: Optional[Path], split: str) -> list[Any]:
    """The sources behind one dataset entry, in file order."""
    files = data_files(location, base)
    if not files:
        return [ArrowRows(_hub_table(location, split), location)]
    path = _locate(location, base)
    if _saved_dataset(path):
        from datasets import load_from_disk

        loaded = load_from_disk(str(path))
        if hasattr(loaded, "keys"):  # a DatasetDict
            loaded = loaded[split]
        return [ArrowRows(loaded.data.table if hasattr(loaded.data, "table") else loaded.data, path.name)]
    return [_file_source(file) for file in files]


def _file_source(file: Path) -> Any:
    if file.suffix == ".jsonl" or (file.suffix == ".json" and _holds_json_lines(file)):
        return JsonLines(file)
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return ArrowRows(pq.read_table(file, memory_map=True), file.name)
    return HeldRows(list(read_file(file)))


def _holds_json_lines(file: Path) -> bool:
    """A .json file of one object per line (as many tools write them), told from a JSON array by its first
    character: an array opens with `[`, a wrapper object spans lines."""
    with file.open("rb") as handle:
        head = handle.read(1 << 16).lstrip(BOM).lstrip()
    if not head.startswith(b"{"):
        return False
    first, _, rest = head.partition(b"\n")
    try:
        json.loads(first)
    except ValueError:
        return False
    return bool(rest.strip())  # one line alone is one JSON value: read whole, as a wrapper or a list


def _hub_table(name: str, split: str) -> Any:
    """A hub dataset's Arrow table (its cache, memory-mapped)."""
    loaded = load_hub(name, split)
    return loaded.data.table if hasattr(loaded.data, "table") else loaded.data
