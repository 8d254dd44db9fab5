"""The data step of a run: read, normalise, mix, split, cap, tokenise, cache.

`prepare()` returns tokenised train/validation examples and a summary that
accounts for every row read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from ..config.schema import Config, DatasetSpec
from ..stages import stage_of
from . import cache
from .chunks import Reading, reading_for, run_chunks
from .order import Order, mix, split, split_rows  # noqa: F401  (split_rows: the split's reference, tested)
from .prepared import Prepared, Summary, entries, kinds_problem, leaves_room  # noqa: F401  (leaves_room: tested here)
from .records import DataError, data_files
from .templates import pick_renderer
from .tokenize import for_workers
from ..staged_folder import staged_folder

DATA_VERSION = "7"  # rows read where they are tokenised; fields a prompt lacks stored empty


def _base_dir(config: Config, config_dir: Optional[Path]) -> Optional[Path]:
    if config.data.dataset_dir:
        return Path(config.data.dataset_dir)
    return config_dir


@dataclass
class Rows:
    """Every row of a run's data, by position: where each source's rows are, how each is read, and each
    split's order. Nothing here holds a row: a chunk of positions is read where it is tokenised."""

    sources: list[Any]
    readings: list[Reading]
    train: Order
    val: Order
    summary: Summary
    kind: Optional[str]  # the record kind of the training rows


def _entry(spec: DatasetSpec, config: Config, base: Optional[Path], rows: Rows, kinds: set) -> Order:
    """One dataset entry's sources, added to `rows`; its rows in file order."""
    from .sources import open_sources, rows_of

    sources = open_sources(spec.path, base, spec.split)
    first = next((next(rows_of(s.payload(np.zeros(1, dtype=np.int64))), None) for s in sources if len(s)), None)
    reading = reading_for(spec, config, base, first)
    if first is not None:
        kinds.add(reading.record(first)["kind"])
    parts = []
    for source in sources:
        parts.append(Order.of(len(rows.sources), len(source)))
        rows.sources.append(source)
        rows.readings.append(reading)
    count, formats = sum(len(s) for s in sources), rows.summary.formats
    if count:
        formats[reading.name] = formats.get(reading.name, 0) + count
    return Order.joined(parts)


def plan_rows(config: Config, config_dir: Optional[Path] = None) -> Rows:
    """Which rows train and validate, in what order, after mixing, the split and the caps (positions only)."""
    d = config.data
    base = _base_dir(config, config_dir)
    if not d.dataset:
        raise DataError("dataset: no training data given; set `dataset:` to a file, folder or hub id")
    empty = Order.joined([])
    rows, kinds = Rows([], [], empty, empty, Summary(), None), set()
    groups = [_entry(spec, config, base, rows, kinds) for spec in entries(config, "train")]
    mixed = mix(groups, d.dataset_weights, d.train_data_split_seed)
    if d.validation_dataset:
        rows.train, rows.val = mixed, Order.joined([_entry(s, config, base, rows, kinds) for s in entries(config, "validation")])
    else:
        rows.train, rows.val = split(mixed, d.validation_split_ratio, d.train_data_split_seed)
    summary = rows.summary
    summary.rows_read = sum(len(s) for s in rows.sources)
    summary.train_rows, summary.val_rows = len(rows.train), len(rows.val)
    for which, cap in (("train", d.max_train_samples), ("val", d.max_val_samples)):
        order = getattr(rows, which)
        if cap >= 0 and len(order) > cap:
            summary.capped[which] = len(order) - cap
            setattr(rows, which, order.take(np.arange(cap)))
    wrong = kinds_problem(config, kinds)
    if wrong:
        raise DataError(wrong)
    rows.kind = next(iter(sorted(kinds)), None)
    return rows


def chunk_size(rows: int, workers: int) -> int:
    return max(64, min(2048, rows // (workers * 4) or 1))


def _tasks(rows: Rows, which: str, workers: int, keep: bool = False) -> Iterator[tuple]:
    """Each chunk of a split as a worker's task: the split's name, its first row's index and what to read."""
    order = rows.train if which == "train" else rows.val
    label = "training" if which == "train" else "validation"
    for first, pieces in order.chunks(chunk_size(len(order), workers)):
        yield label, first, [(source, rows.sources[source].payload(positions)) for source, positions in pieces], keep


@dataclass
class Reckoning:
    """What reading (and tokenising) a split gave, chunk by chunk."""

    rows: int = 0
    outcomes: Counter = field(default_factory=Counter)
    tallies: Counter = field(default_factory=Counter)
    dropped: int = 0
    first_drop: Optional[tuple[str, str]] = None
    records: list = field(default_factory=list)

    def add(self, done: Any) -> None:
        self.rows += done.rows
        self.outcomes += done.outcomes
        self.tallies += done.tallies
        self.dropped += done.dropped
        self.first_drop = self.first_drop or done.first_drop
        if done.records is not None:
            self.records += done.records


def read_only(config: Config, config_dir: Optional[Path], keep: bool = False) -> tuple[Rows, Reckoning, Reckoning]:
    """Every row read and normalised as training will read it, without a tokenizer; the records kept only
    when asked (small data: `load_records`)."""
    rows = plan_rows(config, config_dir)
    workers = 1 if keep else (config.data.preprocessing_num_workers or default_workers(len(rows.train) + len(rows.val)))
    found = {"train": Reckoning(), "val": Reckoning()}
    for which in ("train", "val"):
        run_chunks(_tasks(rows, which, workers, keep), workers, (rows.readings, config, None, None, 0),
                   lambda task, done, r=found[which]: r.add(done))
    _tally_problem(config, found["train"])
    return rows, found["train"], found["val"]


def _tally_problem(config: Config, train: Reckoning) -> None:
    problem = stage_of(config).tally_problem({k: n for k, n in train.tallies.items() if k is not None})
    if problem:
        raise DataError(problem)


def load_records(config: Config, config_dir: Optional[Path] = None) -> tuple[list, list, Summary]:
    """Canonical train and validation records after mixing, split and caps (held: for small data)."""
    rows, train, val = read_only(config, config_dir, keep=True)
    return train.records, val.records, rows.summary


def check_local_records(config: Config, config_dir: Optional[Path] = None) -> Optional[Summary]:
    """Read and normalise the data as training will, without a tokenizer (for `lmtune check`).

    None when a dataset is a hub id or a saved `datasets` folder (reading those is a download or a heavy import),
    or is streamed.
    Raises DataError naming the file and row of the first bad one.
    """
    base = _base_dir(config, config_dir)
    if config.data.streaming:  # a stream is read as training reaches it, never whole
        return None
    for which in ("train", "validation"):
        for spec in entries(config, which):
            files = data_files(spec.path, base)
            if not files or any(f.name in ("dataset_info.json", "state.json") for f in files):
                return None
    known = _records_checked(config, config_dir)
    if known.exists():  # a run tokenised these files with these settings: not read again (millions of rows take minutes)
        try:
            return Summary(**json.loads(known.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    rows, train, _ = read_only(config, config_dir)
    if train.rows and train.dropped == train.rows:  # what tokenising would find too: say it before a model loads
        where, why = train.first_drop
        raise DataError(f"no training example is left after filtering ({train.dropped} dropped: {why}); "
                        f"the first is {where}; fix the data")
    return rows.summary


def _remember_records(config: Config, config_dir: Optional[Path], summary: Summary) -> None:
    """What reading these rows found, for the next `check` (written by a run that tokenised them; `check` writes nothing)."""
    known = _records_checked(config, config_dir)
    try:
        known.parent.mkdir(parents=True, exist_ok=True)
        saved = asdict(summary)
        for kept_apart in ("from_cache", "cache_mib", "streamed"):
            saved.pop(kept_apart)
        known.write_text(json.dumps(saved))
    except OSError:
        pass  # a read-only cache folder: the rows are read again next time


def _records_checked(config: Config, config_dir: Optional[Path]) -> Path:
    """Where the summary of reading these files with these settings is kept (no tokenizer: `check` has none)."""
    settings = config.data.model_dump(mode="json", exclude={"overwrite_cache", "cache_dir", "preprocessing_num_workers"})
    key = {"version": DATA_VERSION, "stage": config.finetuning.stage, "data": settings,
           "files": _file_fingerprint(config, _base_dir(config, config_dir))}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(config.data.cache_dir or ".lmtune-cache") / "records" / f"{digest}.json"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.bos_token, tokenizer.eos_token])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _file_fingerprint(config: Config, base: Optional[Path]) -> list[Any]:
    prints = []
    for which in ("train", "validation"):
        for spec in entries(config, which):
            files = data_files(spec.path, base)
            if not files:
                prints.append([spec.path, spec.split])  # a hub dataset: its name and split
            for path in files:
                prints.append([path.name, *_file_print(path)])
            if config.data.instruction_tuned and files:
                template = files[0].parent / "template.json"
                if template.exists():
                    prints.append(["template.json", hashlib.sha256(template.read_bytes()).hexdigest()])
    return prints


SAMPLE = 1 << 20  # bytes of a data file's head and tail hashed into its fingerprint


def _file_print(path: Path) -> list[Any]:
    """A data file's size, modification time and a hash of its head and tail: a changed file gets a new cache
    without reading gigabytes at every start (`datasets` keys local files by their modification time too)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(SAMPLE))
        if stat.st_size > 2 * SAMPLE:
            handle.seek(stat.st_size - SAMPLE)
        digest.update(handle.read(SAMPLE))
    return [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def fingerprint(config: Config, tokenizer: Any, max_len: int, config_dir: Optional[Path]) -> str:
    settings = config.data.model_dump(mode="json", exclude={"overwrite_cache", "cache_dir", "preprocessing_num_workers"})
    key = {
        "version": DATA_VERSION,
        "stage": config.finetuning.stage,
        "max_len": max_len,
        "data": settings,
        "files": _file_fingerprint(config, _base_dir(config, config_dir)),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


class Blocks:
    """pt: documents joined with the end token into one stream, cut into rows of max_len as chunks arrive."""

    def __init__(self, writer: Any, max_len: int):
        self.writer, self.max_len = writer, max_len
        self.carry = np.zeros(0, dtype=np.int32)

    def add(self, columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        if columns:
            self.carry = np.concatenate([self.carry, columns["input_ids"][0]])
        whole = len(self.carry) // self.max_len * self.max_len
        if whole:
            self._write(self.carry[:whole], np.full(whole // self.max_len, self.max_len, dtype=np.int64))
            self.carry = self.carry[whole:]

    def _write(self, values: np.ndarray, lengths: np.ndarray) -> None:
        if self.max_len > 1 or len(values) > 1:  # a row of one token trains nothing
            self.writer.add({"input_ids": (values, lengths), "labels": (values, lengths)})

    def close(self) -> list[str]:
        if len(self.carry) > 1:
            self._write(self.carry, np.array([len(self.carry)], dtype=np.int64))
        return self.writer.close()


def tokenize_all(rows: Rows, which: str, start: tuple, workers: int, sink: Any) -> Reckoning:
    """Read and tokenise a split in chunks (on `workers` processes), each chunk's columns handed to `sink.add`
    as it is done, so only a few chunks are held at once."""
    from tqdm.auto import tqdm

    order = rows.train if which == "train" else rows.val
    reckoning = Reckoning()
    bar = tqdm(total=len(order), desc=f"tokenising {'train' if which == 'train' else 'validation'}", unit="row",
               leave=False, disable=len(order) < 4 * chunk_size(len(order), workers))

    def done(task: tuple, result: Any) -> None:
        sink.add(result.columns or {})
        reckoning.add(result)
        bar.update(result.rows)

    run_chunks(_tasks(rows, which, workers), workers, start, done)
    bar.close()
    return reckoning


def resolve_max_len(config: Config, context_length: int) -> int:
    wanted = config.data.max_input_length
    if wanted == -1:
        return context_length
    if wanted > context_length:
        raise DataError(
            f"max_input_length: {wanted} is longer than the model's context ({context_length} tokens); "
            f"use at most {context_length}"
        )
    return wanted


def prepare(config: Config, tokenizer: Any, context_length: int, config_dir: Optional[Path] = None,
            processes: int = 1) -> Prepared:
    d = config.data
    max_len = resolve_max_len(config, context_length)
    if d.streaming:
        from .stream import streamed

        return streamed(config, tokenizer, max_len, _base_dir(config, config_dir), processes)
    key = fingerprint(config, tokenizer, max_len, config_dir)
    folder = cache.folder(d.cache_dir, key)
    if not d.overwrite_cache:
        hit = cache.load(folder)
        if hit is not None:
            train, val, saved = hit
            summary = Summary(**saved)
            summary.from_cache, summary.cache_mib = True, cache.disk_bytes(folder) / 2**20
            return Prepared(train, val, summary, folder)
    rows = plan_rows(config, config_dir)
    summary = rows.summary
    read = Summary(**asdict(summary))  # what reading the rows found, before tokenising adds to it
    renderer = pick_renderer(tokenizer, d.template, d.train_on_inputs, d.add_input_output_demarcation_key,
                             d.train_on_reasoning, d.enable_thinking, note=print)
    if d.truncation != "drop" and rows.kind:  # dropping says itself how many rows were too long
        leaves_room([{"kind": rows.kind}], renderer, tokenizer, max_len)
    workers = d.preprocessing_num_workers or default_workers(len(rows.train) + len(rows.val))
    start = (rows.readings, config, renderer, for_workers(tokenizer, renderer) if workers > 1 else tokenizer, max_len)
    try:
        with staged_folder(folder) as staging:
            found, fields = {}, {}
            for split in ("train", "val"):
                writer = cache.Writer(staging, split)
                sink = Blocks(writer, max_len) if rows.kind == "text" else writer
                found[split] = tokenize_all(rows, split, start, workers, sink)
                fields[split] = sink.close()
                setattr(summary, f"{split}_examples", writer.count)
            _tally_problem(config, found["train"])
            summary.outcomes, summary.max_len = dict(found["train"].outcomes + found["val"].outcomes), max_len
            if not summary.train_examples:
                raise _nothing_left(summary, found["train"].first_drop)
            saved = asdict(summary)
            for kept_apart in ("from_cache", "cache_mib", "streamed"):
                saved.pop(kept_apart)
            cache.seal(staging, fields, saved)
    except OSError as exc:
        raise _write_failed(folder, exc) from None
    train, val, _ = cache.load(folder, checked=False)  # sealed a moment ago
    summary.cache_mib = cache.disk_bytes(folder) / 2**20
    if all(data_files(spec.path, _base_dir(config, config_dir)) for spec in entries(config, "train")):
        _remember_records(config, config_dir, read)
    return Prepared(train, val, summary, folder)


MANY_ROWS = 20_000  # from here on, worker processes pay for their start (about a second each)


def default_workers(rows: int) -> int:
    return min(os.cpu_count() or 1, 8) if rows >= MANY_ROWS else 1


def _nothing_left(summary: Summary, first_drop: Optional[tuple[str, str]]) -> DataError:
    reasons = ", ".join(f"{n} {k}" for k, n in summary.outcomes.items()) or "no rows"
    where = f"; the first is {first_drop[0]} ({first_drop[1]})" if first_drop else ""
    return DataError(f"no training example is left after filtering ({reasons}){where}; check max_input_length and the data")


def _write_failed(folder: Path, exc: OSError) -> DataError:
    """A cache that cannot be written (a full disk, a folder it may not write) in one line, with the space left."""
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free / 2**20
    cause = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    return DataError(f"cache_dir: the tokenised-data cache {folder} cannot be written ({cause}; {free:,.0f} MiB free "
                     "there); free some space or set cache_dir to a larger disk")
