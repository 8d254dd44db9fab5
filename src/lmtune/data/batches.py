"""Examples into batches: padded, grouped by length, or packed.

A packed micro batch is one row without padding: its examples back to back,
positions restarting per example, and `cu_seq_lens` marking where each starts.
The attention (model/packed_attention.py) keeps each example to itself, so the
loss equals the unpacked loss.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

IGNORE = -100


def lengths_of(examples: Sequence[dict[str, Any]]) -> list[int]:
    """Tokens per example (a preference pair counts both of its sequences)."""
    if examples and "chosen_input_ids" in examples[0]:
        return [len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples]
    return [len(e["input_ids"]) for e in examples]


def pair_sequences(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A micro batch of preference pairs as sequences: every chosen answer, then every rejected one."""
    return [
        {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
        for side in ("chosen", "rejected")
        for pair in pairs
    ]


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
            **packed_kwargs(batch["cu_seq_lens"], implementation),
        }
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class Batches:
    """One epoch's micro batches, reproducible from (seed, epoch), resumable from a position.

    A micro batch is `micro_batch_size` examples whether packed or not: packing
    only changes how they are laid out (one padding-free row instead of a padded
    block), never which examples are trained together, so it cannot change what
    is learned.
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
    ):
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.packing = packing
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length

    def __len__(self) -> int:
        return (len(self.examples) + self.micro_batch_size - 1) // self.micro_batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if not self.shuffle:
            return order
        rng = random.Random(self.seed * 1_000_003 + epoch)
        rng.shuffle(order)
        if self.group_by_length:
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
        if self.packing:
            return 0.0  # packed micro batches are one row of real tokens
        order = self._order(epoch)
        real = total = 0
        for start in range(0, len(order), self.micro_batch_size):
            chosen = [self.examples[i] for i in order[start : start + self.micro_batch_size]]
            lengths = [len(e["input_ids"]) for e in (pair_sequences(chosen) if "chosen_input_ids" in chosen[0] else chosen)]
            real += sum(lengths)
            total += max(lengths) * len(lengths)
        return 1 - real / total if total else 0.0

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order(epoch)
        for start in range(skip * self.micro_batch_size, len(order), self.micro_batch_size):
            yield self.collate([self.examples[i] for i in order[start : start + self.micro_batch_size]])

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = "chosen_input_ids" in examples[0]
        sequences = pair_sequences(examples) if pairs else examples
        batch = packed_batch(sequences) if self.packing else pad_batch(sequences, self.pad_id)
        if pairs:
            batch["pairs"] = torch.tensor(len(examples))
            if "margin" in examples[0]:
                batch["margin"] = torch.tensor([float(e["margin"][0]) for e in examples])
            if "ref_logps" in examples[0]:  # dpo's reference log-probabilities, computed before training
                batch["ref_logps"] = torch.tensor([list(map(float, e["ref_logps"])) for e in examples], dtype=torch.float32)
        return batch
