"""Examples into batches: padded, grouped by length, packed, or packed to a length.

A packed micro batch is one row without padding: its examples back to back,
positions restarting per example, and `cu_seq_lens` marking where each starts.
The attention (model/packed_attention.py) keeps each example to itself, so the
loss equals the unpacked loss.

Packed to a length (`pack_to_length`), examples are first gathered into rows of
at most `max_input_length` tokens, and a micro batch is `micro_batch_size` such
rows: the meaning of Axolotl's sample_packing and torchtune's packed.
"""

from __future__ import annotations

import random
from array import array
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

IGNORE = -100


def pad_batch(examples: Sequence[dict[str, Any]], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded to the longest example of the batch."""
    ids_key, labels_key = f"{prefix}input_ids", f"{prefix}labels"
    longest = max(len(e[ids_key]) for e in examples)
    ids = np.full((len(examples), longest), pad_id, dtype=np.int64)
    labels = np.full((len(examples), longest), IGNORE, dtype=np.int64)
    mask = np.zeros((len(examples), longest), dtype=np.int64)
    for row, example in enumerate(examples):
        n = len(example[ids_key])
        ids[row, :n] = example[ids_key]
        mask[row, :n] = 1
        if labels_key in example:
            labels[row, :n] = example[labels_key]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "attention_mask": torch.from_numpy(mask)}


def packed_batch(examples: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The examples back to back in one row, with no padding at all.

    `cu_seq_lens` holds where each example starts (and where the last ends); the
    attention keeps every example to itself, and positions restart per example.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    total = sum(lengths)
    ids = np.empty(total, dtype=np.int64)
    labels = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    bounds = np.zeros(len(examples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    for example, start, end in zip(examples, bounds[:-1], bounds[1:]):
        ids[start:end] = example["input_ids"]
        labels[start:end] = example["labels"]
        labels[start] = IGNORE  # nothing in the example predicts its first token
        positions[start:end] = np.arange(end - start)
    return {
        "input_ids": torch.from_numpy(ids)[None],
        "labels": torch.from_numpy(labels)[None],
        "position_ids": torch.from_numpy(positions)[None],
        "cu_seq_lens": torch.from_numpy(bounds),
    }


def attention_inputs(batch: dict[str, torch.Tensor], implementation: Optional[str]) -> dict[str, Any]:
    """The keyword arguments a Hugging Face decoder takes for this batch."""
    if "cu_seq_lens" in batch:
        from ..model.packed_attention import packed_kwargs

        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            **packed_kwargs(batch["cu_seq_lens"], implementation, batch.get("prompt_branches")),
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pack_rows(lengths: Sequence[int], row_length: int, seed: int) -> list[list[int]]:
    """Example indices gathered into rows of at most `row_length` tokens.

    The examples are taken in a seeded shuffled order and each goes into the
    first row with room for it (first fit), so rows mix lengths and fill well.
    The rows are fixed for the whole run (the step count is known up front);
    each epoch shuffles their order.
    """
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 - 1).shuffle(order)
    room = np.empty(0, dtype=np.int64)
    rows: list[list[int]] = []
    for index in order:
        length = min(lengths[index], row_length)
        fits = np.flatnonzero(room >= length)
        if fits.size:
            row = int(fits[0])
        else:
            row = len(rows)
            rows.append([])
            room = np.append(room, row_length)
        rows[row].append(index)
        room[row] -= length
    return rows


class OneEach(Sequence):
    """Rows of one example each, `rows[i] == [i]`, without a list per example (millions of rows)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> list[int]:
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return [index % self.count]


class Sequences:
    """The shape of examples that are one sequence each (pt, sft). Stages whose examples hold more (pairs,
    answers with a label) give Batches a shape of their own with the same three parts."""

    note = ""  # what the shape adds to the layout line, when packed

    def length(self, example: dict[str, Any]) -> int:
        """Tokens the example lays out: what packing to a length and grouping by length read."""
        return len(example["input_ids"])

    def lengths(self, examples: Sequence[dict[str, Any]]) -> list[int]:
        """Every example's length; from the cache's offsets alone when the examples are mapped columns."""
        if hasattr(examples, "field_lengths") and type(self).length is Sequences.length:
            return examples.field_lengths("input_ids").tolist()
        return [self.length(e) for e in examples]

    def sequences(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The sequences (input_ids, labels) a micro batch of examples lays out."""
        return list(examples)

    def collate(self, examples: Sequence[dict[str, Any]], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
        sequences = self.sequences(examples)
        return packed_batch(sequences) if packing else pad_batch(sequences, pad_id)


class Batches:
    """One epoch's micro batches, reproducible from (seed, epoch), resumable from a position.

    A micro batch is `micro_batch_size` examples whether packed or not: packing
    only changes how they are laid out (one padding-free row instead of a padded
    block), never which examples are trained together, so it cannot change what
    is learned. With `pack_length` a micro batch is `micro_batch_size` rows of up
    to that many tokens each (see `pack_rows`), laid out padding-free.
    """

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        micro_batch_size: int,
        pad_id: int,
        *,
        packing: bool = False,
        group_by_length: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        pack_length: Optional[int] = None,
        shape: Optional[Sequences] = None,
    ):
        self.examples = examples
        self.shape = shape or Sequences()
        self.pack_length = pack_length
        # Without pack_length every example is a row of its own.
        self.rows = pack_rows(self.lengths(), pack_length, seed) if pack_length else OneEach(len(examples))
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.shuffle = shuffle and not getattr(examples, "streamed", False)  # a stream trains in its own order
        self.seed = seed
        self.group_by_length = group_by_length

    def lengths(self) -> list[int]:
        if hasattr(self.shape, "lengths"):
            return self.shape.lengths(self.examples)
        return [self.shape.length(e) for e in self.examples]

    def __len__(self) -> int:
        return (len(self.rows) + self.micro_batch_size - 1) // self.micro_batch_size

    def fill(self) -> float:
        """Packed to a length: the share of the rows' positions that hold tokens."""
        if not self.pack_length:
            return 1.0
        return sum(self.lengths()) / (len(self.rows) * self.pack_length)

    def examples_per_micro_batch(self) -> float:
        return len(self.examples) / max(len(self), 1)

    def length_array(self) -> np.ndarray:
        return np.asarray(self.lengths(), dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        """The rows of this epoch, in order (with no pack_length a row is one example). The shuffle is Python's,
        on an int64 array (8 bytes a row rather than a list's 36); grouping by length is done in numpy with the
        same result as sorting each mega-batch and shuffling the micro batches as lists."""
        order = np.arange(len(self.rows), dtype=np.int64)
        if not self.shuffle:
            return order
        rng = random.Random(self.seed * 1_000_003 + epoch)
        shuffled = array("q", order.tobytes())
        rng.shuffle(shuffled)
        order = np.frombuffer(shuffled, dtype=np.int64)
        if self.group_by_length and not self.pack_length:
            # Sort within mega-batches of 50 micro batches: similar lengths together, still shuffled.
            size, micro = self.micro_batch_size * 50, self.micro_batch_size
            lengths = self.length_array()[order]
            mega = np.arange(len(order)) // size
            order = order[np.lexsort((-lengths, mega))]  # stable: ties keep their shuffled order, as sorted() does
            groups = array("q", np.arange(-(-len(order) // micro), dtype=np.int64).tobytes())
            rng.shuffle(groups)  # the same draws as shuffling the list of groups (a shuffle reads only the length)
            starts = np.frombuffer(groups, dtype=np.int64) * micro
            counts = np.minimum(micro, len(order) - starts)
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            order = order[np.repeat(starts, counts) + within]
        return order

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of computed positions that are padding in one epoch (from lengths, no tensors)."""
        if self.packing:
            return 0.0  # packed micro batches are one row of real tokens
        order = self._order(epoch)
        real = total = 0
        if type(self.shape) is Sequences and not self.pack_length:  # each example is its one sequence: lengths suffice
            lengths = self.length_array()[order]
            size = self.micro_batch_size
            rows = np.zeros(-(-len(lengths) // size) * size, dtype=np.int64)  # the last batch filled with 0
            rows[: len(lengths)] = lengths
            rows = rows.reshape(-1, size)
            counts = np.minimum(size, len(lengths) - np.arange(len(rows)) * size)
            real, total = int(rows.sum()), int((rows.max(axis=1) * counts).sum())
            return 1 - real / total if total else 0.0
        for start in range(0, len(order), self.micro_batch_size):
            picked = order[start : start + self.micro_batch_size]
            lengths = [len(e["input_ids"]) for e in self.shape.sequences([self.examples[i] for i in picked])]
            real += sum(lengths)
            total += max(lengths) * len(lengths)
        return 1 - real / total if total else 0.0

    def epoch(self, epoch: int, skip: int = 0, rank: int = 0, ranks: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """The micro batches of `epoch` after the first `skip`. With several processes, process `rank`
        of `ranks` takes every `ranks`-th of them, so the global order is the same for any process count."""
        order = self._order(epoch)
        size = self.micro_batch_size
        for number in range(skip + rank, len(self), ranks):
            rows = order[number * size : (number + 1) * size].tolist()
            yield self.collate([self.examples[i] for row in rows for i in self.rows[row]])

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.shape.collate(examples, self.packing, self.pad_id)


def batch_layout(batches: Batches, micro_per_step: int) -> str:
    """One line on how training batches are laid out (start of `train`, `lmtune data`)."""
    if getattr(batches.examples, "streamed", False):
        return "streamed in file order, " + ("packed without padding" + batches.shape.note if batches.packing else "padded per batch")
    if batches.pack_length:
        per_step = batches.examples_per_micro_batch() * micro_per_step
        return (
            f"packed to {batches.pack_length} tokens per row: {len(batches.examples):,} examples in {len(batches.rows):,} rows "
            f"({len(batches.examples) / max(len(batches.rows), 1):.1f} per row, {batches.fill():.1%} of the positions filled), "
            f"{per_step:.1f} examples per step"
        )
    if batches.packing:
        return "packed without padding" + batches.shape.note
    return f"padding {batches.padding_fraction():.1%} of the positions"
