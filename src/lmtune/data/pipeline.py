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
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config, DatasetSpec
from ..stages import stage_of
from .records import (
    FORMAT_COLUMNS,
    DataError,
    Row,
    data_files,
    detect_format,
    jumpstart_template,
    normalise,
    read_rows,
    render_jumpstart,
    rename_columns,
)
from .templates import pick_renderer
from ..staged_folder import staged_folder
from .tokenize import tokenize_records

DATA_VERSION = "6"  # whole-text tokenisation with offset masks; reasoning and tool turns


@dataclass
class Summary:
    rows_read: int = 0
    train_rows: int = 0
    val_rows: int = 0
    capped: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # kept / truncated / dropped: why
    train_examples: int = 0
    val_examples: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    from_cache: bool = False
    max_len: int = 0
    cache_mib: float = 0.0  # the tokenised data's size on disk (mapped by training, not loaded)

    def lines(self) -> list[str]:
        out = [f"rows read: {self.rows_read} ({', '.join(f'{n} {k}' for k, n in self.formats.items())})"]
        out.append(f"split: {self.train_rows} train, {self.val_rows} validation")
        for which, n in self.capped.items():
            out.append(f"capped: {n} {which} rows left out by max_{which}_samples")
        for outcome, n in sorted(self.outcomes.items()):
            out.append(f"{outcome}: {n}")
        out.append(f"examples: {self.train_examples} train, {self.val_examples} validation (max {self.max_len} tokens)")
        out.append("tokenised data: " + ("from cache" if self.from_cache else "built and cached") +
                   (f", {self.cache_mib:,.1f} MiB on disk, memory-mapped (training holds only the pages it reads)"
                    if self.cache_mib else ""))
        return out


@dataclass
class Prepared:
    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    summary: Summary
    folder: Optional[Path] = None  # the tokenised-data cache these came from or went to


def _entries(config: Config, which: str) -> list[DatasetSpec]:
    d = config.data
    items = d.dataset if which == "train" else d.validation_dataset
    fmt = "chat" if d.chat_dataset and d.dataset_format == "auto" else d.dataset_format  # JumpStart's dialog data
    return [DatasetSpec(path=e, format=fmt) if isinstance(e, str) else e for e in items]


def _base_dir(config: Config, config_dir: Optional[Path]) -> Optional[Path]:
    if config.data.dataset_dir:
        return Path(config.data.dataset_dir)
    return config_dir


def _records_of(spec: DatasetSpec, config: Config, base: Optional[Path], formats: Counter) -> list[dict[str, Any]]:
    d = config.data
    columns = {**d.dataset_columns, **spec.columns}
    template = None
    if d.instruction_tuned:
        files = data_files(spec.path, base)
        folder = files[0].parent if files else None
        template = jumpstart_template(folder) if folder else None
        if template is None:
            raise DataError(f"{spec.path}: instruction_tuned is true but there is no template.json beside the data")
    records: list[dict[str, Any]] = []
    fmt: Optional[str] = None if spec.format == "auto" else spec.format
    for row in read_rows(spec.path, base, spec.split):
        values = rename_columns(row.values, columns)
        row = Row(values, row.where)
        if template is not None:
            records.append(render_jumpstart(row, template))
            formats["instruction (template.json)"] += 1
            continue
        if fmt is None:
            fmt = detect_format(set(values))
            if fmt is None:
                expected = "; ".join(f"{k}: {v}" for k, v in FORMAT_COLUMNS.items())
                raise DataError(
                    f"{row.where}: cannot tell the format from the columns {sorted(values)}; expected {expected}. "
                    "Map odd names with dataset_columns or set dataset_format"
                )
        records.append(normalise(row, fmt))
        formats[fmt] += 1
    return records


def _mix(groups: list[list[dict[str, Any]]], weights: list[float], seed: int) -> list[dict[str, Any]]:
    """Resample datasets to the given shares of the total row count (repeating small ones)."""
    if not weights:
        return [r for g in groups for r in g]
    total = sum(len(g) for g in groups)
    rng = random.Random(seed)
    out = []
    for group, weight in zip(groups, weights):
        want = round(total * weight / sum(weights))
        if not group:
            continue
        repeats, rest = divmod(want, len(group))
        out += group * repeats + rng.sample(group, rest)
    return out


def split_rows(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation rows; the same seed always gives the same split."""
    if ratio <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * ratio)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def load_records(config: Config, config_dir: Optional[Path] = None) -> tuple[list, list, Summary]:
    """Canonical train and validation records after mixing, split and caps."""
    d = config.data
    base = _base_dir(config, config_dir)
    summary = Summary()
    formats: Counter = Counter()
    if not d.dataset:
        raise DataError("dataset: no training data given; set `dataset:` to a file, folder or hub id")
    groups = [_records_of(spec, config, base, formats) for spec in _entries(config, "train")]
    summary.rows_read = sum(len(g) for g in groups)
    records = _mix(groups, d.dataset_weights, d.train_data_split_seed)
    if d.validation_dataset:
        val = [r for spec in _entries(config, "validation") for r in _records_of(spec, config, base, formats)]
        summary.rows_read += len(val)
        train = records
    else:
        train_idx, val_idx = split_rows(len(records), d.validation_split_ratio, d.train_data_split_seed)
        train, val = [records[i] for i in train_idx], [records[i] for i in val_idx]
    summary.formats = dict(formats)
    summary.train_rows, summary.val_rows = len(train), len(val)
    for which, cap in (("train", d.max_train_samples), ("val", d.max_val_samples)):
        rows = train if which == "train" else val
        if cap >= 0 and len(rows) > cap:
            summary.capped[which] = len(rows) - cap
            rows[:] = rows[:cap]
    stage = stage_of(config)
    kinds = {r["kind"] for r in train + val}
    wrong = kinds - stage.reads
    if wrong:
        raise DataError(
            f"stage {stage.name} cannot learn from {', '.join(sorted(wrong))} rows; it needs "
            f"{' or '.join(sorted(stage.reads))} data (check dataset_format and stage)"
        )
    train, val = stage.records(train, val, config)
    return train, val, summary


def check_local_records(config: Config, config_dir: Optional[Path] = None) -> Optional[Summary]:
    """Read and normalise the data as training will, without a tokenizer (for `lmtune check`).

    None when a dataset is a hub id or a saved `datasets` folder: reading those is a download or a heavy import.
    Raises DataError naming the file and row of the first bad one.
    """
    base = _base_dir(config, config_dir)
    for which in ("train", "validation"):
        for spec in _entries(config, which):
            files = data_files(spec.path, base)
            if not files or any(f.name in ("dataset_info.json", "state.json") for f in files):
                return None
    known = _records_checked(config, config_dir)
    if known.exists():  # a run tokenised these files with these settings: not read again (millions of rows take minutes)
        try:
            return Summary(**json.loads(known.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    train, _, summary = load_records(config, config_dir)
    kept = [r for r in train if not r.get("drop")]
    if train and not kept:  # what tokenising would find too: say it before a model loads
        raise DataError(f"no training example is left after filtering ({len(train)} dropped: {train[0]['drop']}); "
                        f"the first is {train[0]['where']}; fix the data")
    return summary


def _remember_records(config: Config, config_dir: Optional[Path], summary: Summary) -> None:
    """What reading these rows found, for the next `check` (written by a run that tokenised them; `check` writes nothing)."""
    known = _records_checked(config, config_dir)
    try:
        known.parent.mkdir(parents=True, exist_ok=True)
        saved = asdict(summary)
        saved.pop("from_cache")
        saved.pop("cache_mib")
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
        for spec in _entries(config, which):
            files = data_files(spec.path, base)
            if not files:
                prints.append([spec.path, spec.split])  # a hub dataset: its name and split
            for path in files:
                prints.append([path.name, hashlib.sha256(path.read_bytes()).hexdigest()])
            if config.data.instruction_tuned and files:
                template = files[0].parent / "template.json"
                if template.exists():
                    prints.append(["template.json", hashlib.sha256(template.read_bytes()).hexdigest()])
    return prints


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


_WORKER: dict[str, Any] = {}  # in a tokenising worker: the renderer, tokenizer and limits, sent once at its start


def _start_worker(renderer: Any, tokenizer: Any, max_len: int, policy: str) -> None:
    _WORKER.update(renderer=renderer, tokenizer=tokenizer, max_len=max_len, policy=policy)


def _tokenize_chunk(records: list[dict[str, Any]]) -> tuple[list, Counter]:
    w = _WORKER
    return tokenize_records(records, w["renderer"], w["tokenizer"], w["max_len"], w["policy"])


def leaves_room(records: list[dict[str, Any]], renderer: Any, tokenizer: Any, max_len: int) -> None:
    """max_input_length must hold the template around a one-word exchange and some answer: else every row
    would be cut to the template's last tokens and trained without its prompt."""
    if not records or records[0]["kind"] not in ("chat", "preference", "unpaired"):
        return
    from .tokenize import encode_batch

    bare = {"kind": "chat", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    segments = renderer.record(bare)
    overhead = sum(len(piece) for piece in encode_batch(tokenizer, [text for text, _ in segments]))
    if max_len < overhead + 8:
        raise DataError(
            f"max_input_length: {max_len} tokens leave no room for the data: the chat template alone takes {overhead} tokens "
            f"around a one-word exchange; set max_input_length to at least {overhead + 64} (the longest row needs more)"
        )


def tokenize_all(
    records: list[dict[str, Any]], renderer: Any, tokenizer: Any, max_len: int, policy: str, workers: int, label: str,
    sink: Any,
) -> tuple[int, Counter]:
    """Tokenise in chunks (on `workers` processes), each chunk's examples handed to `sink.add` as it is done,
    so only a chunk's examples are held; (examples written, outcomes)."""
    from tqdm.auto import tqdm

    if not records:
        return 0, Counter()
    if records[0]["kind"] == "text":  # documents are joined across rows: one stream
        examples, outcomes = tokenize_records(records, renderer, tokenizer, max_len, policy)
        for start in range(0, len(examples), 4096):
            sink.add(examples[start : start + 4096])
        return len(examples), outcomes
    size = max(64, min(2048, len(records) // (workers * 4) or 1))
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    written, outcomes = 0, Counter()
    bar = tqdm(total=len(records), desc=f"tokenising {label}", unit="row", leave=False, disable=len(chunks) < 4)
    if workers > 1:
        import multiprocessing

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, _start_worker, (renderer, tokenizer, max_len, policy)) as pool:
            for (part, counts), chunk in zip(pool.imap(_tokenize_chunk, chunks), chunks):
                sink.add(part)
                written, outcomes = written + len(part), outcomes + counts
                bar.update(len(chunk))
    else:
        _start_worker(renderer, tokenizer, max_len, policy)
        for chunk in chunks:
            part, counts = _tokenize_chunk(chunk)
            sink.add(part)
            written, outcomes = written + len(part), outcomes + counts
            bar.update(len(chunk))
        _WORKER.clear()
    bar.close()
    return written, outcomes


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


def prepare(config: Config, tokenizer: Any, context_length: int, config_dir: Optional[Path] = None) -> Prepared:
    d = config.data
    max_len = resolve_max_len(config, context_length)
    key = fingerprint(config, tokenizer, max_len, config_dir)
    from . import cache  # numpy: kept out of `lmtune check`, which reads records only

    folder = cache.folder(d.cache_dir, key)
    if not d.overwrite_cache:
        hit = cache.load(folder)
        if hit is not None:
            train, val, saved = hit
            summary = Summary(**saved)
            summary.from_cache, summary.cache_mib = True, cache.disk_bytes(folder) / 2**20
            return Prepared(train, val, summary, folder)
    train_records, val_records, summary = load_records(config, config_dir)
    read = Summary(**asdict(summary))  # what reading the rows found, before tokenising adds to it
    renderer = pick_renderer(tokenizer, d.template, d.train_on_inputs, d.add_input_output_demarcation_key,
                             d.train_on_reasoning, d.enable_thinking, note=print)
    if d.truncation != "drop":  # dropping says itself how many rows were too long
        leaves_room(train_records, renderer, tokenizer, max_len)
    workers = d.preprocessing_num_workers or default_workers(len(train_records) + len(val_records))
    try:
        with staged_folder(folder) as staging:
            outcomes: Counter = Counter()
            fields = {}
            for split, records in (("train", train_records), ("val", val_records)):
                writer = cache.Writer(staging, split)
                count, counts = tokenize_all(records, renderer, tokenizer, max_len, d.truncation, workers,
                                             "train" if split == "train" else "validation", writer)
                fields[split] = writer.close()
                outcomes += counts
                setattr(summary, f"{split}_examples", count)
            summary.outcomes, summary.max_len = dict(outcomes), max_len
            if not summary.train_examples:
                raise _nothing_left(summary, train_records)
            saved = asdict(summary)
            saved.pop("from_cache")
            saved.pop("cache_mib")
            cache.seal(staging, fields, saved)
    except OSError as exc:
        raise _write_failed(folder, exc) from None
    train, val, _ = cache.load(folder)
    summary.cache_mib = cache.disk_bytes(folder) / 2**20
    if all(data_files(spec.path, _base_dir(config, config_dir)) for spec in _entries(config, "train")):
        _remember_records(config, config_dir, read)
    return Prepared(train, val, summary, folder)


MANY_ROWS = 20_000  # from here on, worker processes pay for their start (about a second each)


def default_workers(rows: int) -> int:
    return min(os.cpu_count() or 1, 8) if rows >= MANY_ROWS else 1


def _nothing_left(summary: Summary, train_records: list[dict[str, Any]]) -> DataError:
    reasons = ", ".join(f"{n} {k}" for k, n in summary.outcomes.items()) or "no rows"
    first = next((r for r in train_records if r.get("drop")), None)
    where = f"; the first is {first['where']} ({first['drop']})" if first else ""
    return DataError(f"no training example is left after filtering ({reasons}){where}; check max_input_length and the data")


def _write_failed(folder: Path, exc: OSError) -> DataError:
    """A cache that cannot be written (a full disk, a folder it may not write) in one line, with the space left."""
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free / 2**20
    cause = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
    return DataError(f"cache_dir: the tokenised-data cache {folder} cannot be written ({cause}; {free:,.0f} MiB free "
                     "there); free some space or set cache_dir to a larger disk")
