"""What the data step hands to training, and the rules both its ways (cached, streamed) share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config, DatasetSpec
from ..stages import stage_of
from .records import DataError


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
    streamed: bool = False  # `streaming: true`: training rows are read and tokenised as training reaches them

    def lines(self) -> list[str]:
        if self.streamed:
            return [f"streamed: training rows are read and tokenised in stream order as training reaches them; "
                    f"{self.val_rows} validation rows from the head ({self.val_examples} examples, max {self.max_len} tokens)"]
        out = [f"rows read: {self.rows_read} ({', '.join(f'{n} {k}' for k, n in self.formats.items())})"]
        out.append(f"split: {self.train_rows} train, {self.val_rows} validation")
        for which, n in self.capped.items():
            out.append(f"capped: {n} {which} rows left out by max_{which}_samples")
        for outcome, n in sorted(self.outcomes.items()):
            out.append(f"{outcome}: {n}")
        out.append(f"examples: {self.train_examples} train, {self.val_examples} validation (max {self.max_len} tokens)")
        out.append("tokenised data: " + ("from cache" if self.from_cache else "built and cached") +
                   (f", {self.cache_mib:,.1f} MiB on disk, memory-mapped: training holds about "
                    f"{8 * (self.train_examples + self.val_examples) / 2**20:,.1f} MiB of it in memory (each epoch's order, "
                    "8 bytes an example) and only the pages it reads" if self.cache_mib else ""))
        return out


@dataclass
class Prepared:
    train: Sequence[dict[str, Any]]  # mapped columns of the cache (data/cache.Columns), or a Stream
    val: Sequence[dict[str, Any]]
    summary: Summary
    folder: Optional[Path] = None  # the tokenised-data cache these came from or went to


def entries(config: Config, which: str) -> list[DatasetSpec]:
    d = config.data
    items = d.dataset if which == "train" else d.validation_dataset
    fmt = "chat" if d.chat_dataset and d.dataset_format == "auto" else d.dataset_format  # JumpStart's dialog data
    return [DatasetSpec(path=e, format=fmt) if isinstance(e, str) else e for e in items]


def kinds_problem(config: Config, kinds: set[str]) -> Optional[str]:
    stage = stage_of(config)
    wrong = kinds - stage.reads
    if not wrong:
        return None
    return (f"stage {stage.name} cannot learn from {', '.join(sorted(wrong))} rows; it needs "
            f"{' or '.join(sorted(stage.reads))} data (check dataset_format and stage)")


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
