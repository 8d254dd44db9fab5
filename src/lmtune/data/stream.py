"""`streaming: true`: examples tokenised as training reaches them, from rows read in order and never whole.

For hub datasets (read through `datasets`' own streaming) and files too large to tokenise up front. Rows are
read in file order; several datasets interleave row by row, each drawn with the probability of its weight
(seeded), and each starts again when it ends. A chunk of rows is tokenised in the training process when the
batches reach it, and the stream starts again from its first training row when it ends: `max_steps` sets
the run's length. The first `max_val_samples` rows validate (of `validation_dataset` when it is given, else
of the stream, whose training rows then begin after them). A resumed run reads the stream again up to the
example it stopped at, so it trains the same examples in the same order as one that never stopped. Each
process reads the stream and takes its own micro batches of the one global order.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..config.schema import Config
from ..stages import stage_of
from .chunks import reading_for
from .prepared import Prepared, Summary, entries, kinds_problem, leaves_room
from .records import DataError, read_rows
from .tokenize import encode_batch, tokenize_records

CHUNK = 256  # rows tokenised at a time as training reaches them
BARREN = 400  # chunks in a row without an example: the stream cannot train


def _entry_records(spec: Any, config: Config, base: Optional[Path], which: str) -> Iterator[dict[str, Any]]:
    """One dataset entry's rows as the stage learns from them, in file order."""
    stage, reading = stage_of(config), None
    for number, row in enumerate(read_rows(spec.path, base, spec.split, streaming=True), 1):
        if reading is None:
            reading = reading_for(spec, config, base, row)
        yield stage.record(reading.record(row), which, number, config)


def _cycled(make: Callable[[], Iterator[dict[str, Any]]], what: str) -> Iterator[dict[str, Any]]:
    """The rows again and again; a stream that holds none is said in one line."""
    while True:
        empty = True
        for record in make():
            empty = False
            yield record
        if empty:
            raise DataError(f"dataset: {what} holds no rows to stream; check the dataset")


def training_records(config: Config, base: Optional[Path], head: int) -> Iterator[dict[str, Any]]:
    """The endless training stream: datasets interleaved by weight (or one after another), the first `head`
    rows left to validation, at most `max_train_samples` rows before it starts again."""
    d = config.data
    specs = entries(config, "train")
    cap = d.max_train_samples if d.max_train_samples > 0 else None

    def one_pass() -> Iterator[dict[str, Any]]:
        if not d.dataset_weights:
            rows: Iterator[dict[str, Any]] = (r for spec in specs for r in _entry_records(spec, config, base, "training"))
        else:
            rows = _interleaved(specs, d.dataset_weights, config, base, d.train_data_split_seed)
        return islice(rows, head, None if cap is None else head + cap)

    return _cycled(one_pass, "the training data")


def _interleaved(specs: list[Any], weights: list[float], config: Config, base: Optional[Path],
                 seed: int) -> Iterator[dict[str, Any]]:
    """Row by row, entry i drawn with probability weights[i] / sum; each entry repeats when it ends."""
    streams = [_cycled(lambda spec=spec: _entry_records(spec, config, base, "training"), spec.path) for spec in specs]
    rng = random.Random(seed)
    while True:
        yield next(rng.choices(streams, weights)[0])


def validation_records(config: Config, base: Optional[Path]) -> tuple[list[dict[str, Any]], int]:
    """The validation rows, and how many rows of the training stream they take from its head."""
    d = config.data
    count = d.max_val_samples if d.max_val_samples > 0 else None
    if d.validation_dataset:
        rows = (r for spec in entries(config, "validation") for r in _entry_records(spec, config, base, "validation"))
        return list(islice(rows, count)), 0
    if count is None:
        return [], 0
    spec_rows = (r for spec in entries(config, "train") for r in _entry_records(spec, config, base, "validation"))
    head = list(islice(spec_rows, count))
    return head, len(head)


class Stream(Sequence):
    """Training examples in stream order: `stream[i]` tokenises up to example i the first time it is asked
    for. Asked in increasing order (as batches are), it holds one chunk; asking for an earlier example reads
    the stream again from its start."""

    streamed = True

    def __init__(self, records: Callable[[], Iterator[dict[str, Any]]], examples: Callable[[list, list], list], length: int):
        self._records, self._examples, self._length = records, examples, length
        self._restart()

    def _restart(self) -> None:
        self._rows = self._records()
        self._buffer: deque = deque()
        self._base = 0  # the index of the buffer's first example
        self._carry: list[int] = []  # pt: the end of the token stream, not yet a whole row

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if not 0 <= index < self._length:
            raise IndexError(index)
        if index < self._base:
            self._restart()
        empty = 0
        while index >= self._base + len(self._buffer):
            self._base += len(self._buffer)
            self._buffer.clear()
            self._buffer.extend(self._examples(list(islice(self._rows, CHUNK)), self._carry))
            empty = 0 if self._buffer else empty + 1
            if empty == BARREN:
                raise DataError(f"dataset: {BARREN * CHUNK:,} rows of the stream in a row gave no example (each too "
                                "long for max_input_length, or dropped); check max_input_length and the data")
        while self._base < index:
            self._buffer.popleft()
            self._base += 1
        return self._buffer[0]


def _tokenised(renderer: Any, tokenizer: Any, max_len: int, policy: str) -> Callable[[list, list], list]:
    """A chunk of records to examples; pt documents join one token stream (its unfinished row kept in `carry`)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def examples(records: list[dict[str, Any]], carry: list[int]) -> list[dict[str, Any]]:
        if not records or records[0]["kind"] != "text":
            return tokenize_records(records, renderer, tokenizer, max_len, policy)[0]
        for tokens in encode_batch(tokenizer, [r["text"] for r in records]):
            carry += tokens + eos
        whole = len(carry) // max_len * max_len
        rows = [carry[i : i + max_len] for i in range(0, whole, max_len)]
        del carry[:whole]
        return [{"input_ids": row, "labels": list(row)} for row in rows if len(row) > 1]

    return examples


def streamed(config: Config, tokenizer: Any, max_len: int, base: Optional[Path], processes: int) -> Any:
    """Prepared data whose training examples are a Stream and whose validation examples are the head's."""
    from .templates import pick_renderer

    d, t = config.data, config.training
    renderer = pick_renderer(tokenizer, d.template, d.train_on_inputs, d.add_input_output_demarcation_key,
                             d.train_on_reasoning, d.enable_thinking, note=print)
    val_records, head = validation_records(config, base)
    first = next(training_records(config, base, head))
    wrong = kinds_problem(config, {first["kind"]})
    if wrong:
        raise DataError(wrong)
    if d.truncation != "drop":
        leaves_room([first], renderer, tokenizer, max_len)
    examples = _tokenised(renderer, tokenizer, max_len, d.truncation)
    val = examples(val_records, []) if val_records else []
    if val_records and val_records[0]["kind"] == "text" and not val:
        raise DataError("max_val_samples: the validation rows hold too few tokens for one example; take more rows")
    needed = max(t.max_steps, 1) * t.gradient_accumulation_steps * processes * t.micro_batch_size
    summary = Summary(val_rows=len(val_records), val_examples=len(val), max_len=max_len, streamed=True)
    return Prepared(Stream(lambda: training_records(config, base, head), examples, needed), val, summary)
