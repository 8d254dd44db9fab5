"""One chunk of rows, from its file to token columns, in whichever process runs it.

A worker is sent, once, how each source's rows become records (`Reading`),
the stage, the renderer and the tokenizer; then chunks of positions. It parses
the rows, normalises them, applies the stage's per-row rule and tokenises,
and returns flat numpy columns (cheap to send back, written as they come).
The main process keeps a bounded window of chunks in flight, so neither side
ever holds more than a few chunks of the dataset.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from .cache import flatten
from .records import (
    FORMAT_COLUMNS, DataError, Row, data_files, detect_format, jumpstart_template, normalise, rename_columns,
    render_jumpstart,
)
from .sources import close_files, rows_of
from .tokenize import tokenize_records

@dataclass
class Reading:
    """How one source's rows become canonical records."""

    columns: dict[str, str]
    fmt: str
    template: Optional[dict[str, str]] = None  # JumpStart's template.json

    @property
    def name(self) -> str:
        """The format as the data summary counts it."""
        return "instruction (template.json)" if self.template is not None else self.fmt

    def record(self, row: Row) -> dict[str, Any]:
        row = Row(rename_columns(row.values, self.columns), row.where)
        if self.template is not None:
            return render_jumpstart(row, self.template)
        return normalise(row, self.fmt)


def reading_for(spec: Any, config: Any, base: Any, first: Optional[Row]) -> Reading:
    """How a dataset entry's rows are read: its columns renamed, its format as set or told from its first row."""
    d = config.data
    columns = {**d.dataset_columns, **spec.columns}
    template = None
    if d.instruction_tuned:
        files = data_files(spec.path, base)
        template = jumpstart_template(files[0].parent) if files else None
        if template is None:
            raise DataError(f"{spec.path}: instruction_tuned is true but there is no template.json beside the data")
    fmt = None if spec.format == "auto" else spec.format
    if first is not None and fmt is None and template is None:
        values = rename_columns(first.values, columns)
        fmt = detect_format(set(values))
        if fmt is None:
            expected = "; ".join(f"{k}: {v}" for k, v in FORMAT_COLUMNS.items())
            raise DataError(
                f"{first.where}: cannot tell the format from the columns {sorted(values)}; expected {expected}. "
                "Map odd names with dataset_columns or set dataset_format"
            )
    return Reading(columns, fmt or "", template)


@dataclass
class Done:
    """What one chunk gave: its columns (None when only read), and what became of its rows."""

    columns: Optional[dict[str, tuple[np.ndarray, np.ndarray]]]
    outcomes: Counter
    rows: int
    tallies: Counter = field(default_factory=Counter)  # what the stage counts over its rows (kto: each label)
    dropped: int = 0  # rows dropped while reading (every answer empty, ...)
    first_drop: Optional[tuple[str, str]] = None  # (where, why) of the first of them
    records: Optional[list[dict[str, Any]]] = None  # the records themselves, when asked for (small data only)


_WORKER: dict[str, Any] = {}  # in a worker: what `start_worker` was sent


def start_worker(readings: list[Reading], config: Any, renderer: Any, tokenizer: Any, max_len: int) -> None:
    from ..stages import stage_of

    close_files()
    try:
        _WORKER.update(readings=readings, config=config, stage=stage_of(config), renderer=renderer,
                       tokenizer=tokenizer, max_len=max_len, policy=config.data.truncation)
    except Exception as exc:  # raised from the first task instead: a pool restarts a worker whose start fails, forever
        _WORKER["failed"] = exc


def records_of(which: str, first: int, pieces: list[tuple[int, tuple]]) -> tuple[list[dict[str, Any]], Counter]:
    """A chunk's rows as the stage learns from them, and what the stage tallies over them."""
    w = _WORKER
    stage, config = w["stage"], w["config"]
    records, tallies = [], Counter()
    for source, payload in pieces:
        reading = w["readings"][source]
        for row in rows_of(payload):
            record = stage.record(reading.record(row), which, first + len(records) + 1, config)
            tallies[stage.tally(record)] += 1
            records.append(record)
    return records, tallies


def work(task: tuple[str, int, list[tuple[int, tuple]], bool]) -> Done:
    if "failed" in _WORKER:
        raise _WORKER["failed"]
    which, first, pieces, keep_records = task
    records, tallies = records_of(which, first, pieces)
    dropped = [r for r in records if r.get("drop")]
    done = Done(None, Counter(), len(records), tallies, len(dropped),
                (dropped[0]["where"], dropped[0]["drop"]) if dropped else None)
    w = _WORKER
    if keep_records:
        done.records = records
    elif w["tokenizer"] is not None:
        if records and records[0]["kind"] == "text":  # documents: the main process joins them into one stream
            done.columns, done.outcomes = documents(records, w["tokenizer"]), Counter({"kept": len(records)})
        else:
            examples, done.outcomes = tokenize_records(records, w["renderer"], w["tokenizer"], w["max_len"], w["policy"])
            done.columns = flatten(examples)
    return done


def documents(records: list[dict[str, Any]], tokenizer: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from .tokenize import encode_batch

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return flatten([{"input_ids": tokens + eos} for tokens in encode_batch(tokenizer, [r["text"] for r in records])])


def run_chunks(tasks: Iterator[tuple], workers: int, start: tuple, on_done: Any) -> None:
    """`work` on every task, `on_done(task, done)` called in task order. With several workers, at most a few
    chunks per worker are in flight (the main process builds a held source's payload only when it is sent)."""
    if workers <= 1:
        start_worker(*start)
        try:
            for task in tasks:
                on_done(task, work(task))
        finally:
            _WORKER.clear()
            close_files()
        return
    import multiprocessing
    from collections import deque

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, start_worker, start) as pool:
        flight: deque = deque()
        for task in tasks:
            flight.append((task, pool.apply_async(work, (task,))))
            if len(flight) >= 3 * workers:
                sent, result = flight.popleft()
                on_done(sent, result.get())
        while flight:
            sent, result = flight.popleft()
            on_done(sent, result.get())

