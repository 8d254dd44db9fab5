"""Examples into batches: padded, grouped by length, or packed.

Packed sequences carry `seq_ids` (which example each token belongs to) and
restarting `position_ids`; `attention_inputs` turns them into a block-diagonal
causal mask, so packed examples never see each other and the loss equals the
unpacked loss.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import torch

IGNORE = -100


def lengths_of(examples: Sequence[dict[str, Any]], field: str = "input_ids") -> list[int]:
    return [len(e[field]) for e in examples]


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


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: example indices grouped into sequences of at most `capacity` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        size = lengths[index]
        for b, free in enumerate(room):
            if free >= size:
                bins[b].append(index)
                room[b] -= size
                break
        else:
            bins.append([index])
            room.append(capacity - size)
    return bins


def packed_batch(examples: Sequence[dict[str, Any]], bins: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each row holds the examples of one bin back to back; padding is its own block."""
    totals = [sum(len(examples[i]["input_ids"]) for i in b) for b in bins]
    longest = max(totals)
    shape = (len(bins), longest)
    ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    seq_ids = np.full(shape, -1, dtype=np.int64)
    for row, members in enumerate(bins):
        at = 0
        for number, index in enumerate(members):
            example = examples[index]
            n = len(example["input_ids"])
            ids[row, at : at + n] = example["input_ids"]
            labels[row, at : at + n] = example["labels"]
            labels[row, at] = IGNORE  # nothing in the example predicts its first token
            positions[row, at : at + n] = np.arange(n)
            seq_ids[row, at : at + n] = number
            at += n
        positions[row, at:] = np.arange(longest - at)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "seq_ids": torch.from_numpy(seq_ids),
    }


def block_causal_mask(seq_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L) additive mask: a token sees earlier tokens of its own example only."""
    length = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=seq_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def attention_inputs(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The keyword arguments a Hugging Face decoder takes for this batch."""
    if "seq_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": block_causal_mask(batch["seq_ids"], dtype),
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Batches:
    """One epoch's micro batches, reproducible from (seed, epoch), resumable from a position."""

    def __init__(
        self,
        examples: Sequence[dict[str, Any]],
        micro_batch_size: int,
        pad_id: int,
        *,
        packing_length: int = 0,
        group_by_length: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ):
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.bins = pack_bins(lengths_of(examples), packing_length) if packing_length else None

    def __len__(self) -> int:
        units = len(self.bins) if self.bins is not None else len(self.examples)
        return (units + self.micro_batch_size - 1) // self.micro_batch_size

    def _order(self, epoch: int) -> list[int]:
        units = len(self.bins) if self.bins is not None else len(self.examples)
        order = list(range(units))
        if not self.shuffle:
            return order
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if self.group_by_length and self.bins is None:
            # Sort within mega-batches of 50 micro batches: similar lengths together, still shuffled.
            lengths = lengths_of(self.examples)
            size = self.micro_batch_size * 50
            chunks = [sorted(order[i : i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
            groups = [c[i : i + self.micro_batch_size] for c in chunks for i in range(0, len(c), self.micro_batch_size)]
            rng.shuffle(groups)
            order = [i for g in groups for i in g]
        return order

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of computed positions that are padding in one epoch (from lengths, no tensors)."""
        lengths = lengths_of(self.examples)
        if self.bins is not None:
            lengths = [sum(lengths[i] for i in b) for b in self.bins]
        order = self._order(epoch)
        real = total = 0
        for start in range(0, len(order), self.micro_batch_size):
            chosen = [lengths[i] for i in order[start : start + self.micro_batch_size]]
            real += sum(chosen)
            total += max(chosen) * len(chosen)
        return 1 - real / total if total else 0.0

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order(epoch)
        for start in range(skip * self.micro_batch_size, len(order), self.micro_batch_size):
            chosen = order[start : start + self.micro_batch_size]
            if self.bins is not None:
                yield packed_batch(self.examples, [self.bins[i] for i in chosen], self.pad_id)
            else:
                yield pad_batch([self.examples[i] for i in chosen], self.pad_id)
