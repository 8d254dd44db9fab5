"""Which rows train and which validate, in what order: mixing, the split and the caps, worked out on
positions alone (a source number and a row position per row), before any row is parsed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass
class Order:
    """Rows in training order: row i is row `position[i]` of source `source[i]`."""

    source: np.ndarray
    position: np.ndarray

    @classmethod
    def of(cls, source: int, count: int) -> "Order":
        return cls(np.full(count, source, dtype=np.int32), np.arange(count, dtype=np.int64))

    @classmethod
    def joined(cls, parts: list["Order"]) -> "Order":
        if not parts:
            return cls(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.source for p in parts]), np.concatenate([p.position for p in parts]))

    def __len__(self) -> int:
        return len(self.position)

    def take(self, index: np.ndarray) -> "Order":
        return Order(self.source[index], self.position[index])

    def chunks(self, size: int) -> Iterator[tuple[int, list[tuple[int, np.ndarray]]]]:
        """(first row's index, [(source, positions), ...]) for each run of `size` rows; a chunk that spans
        sources has one piece per run of rows from the same source."""
        for start in range(0, len(self), size):
            sources, positions = self.source[start : start + size], self.position[start : start + size]
            cuts = np.flatnonzero(np.diff(sources)) + 1
            edges = [0, *cuts.tolist(), len(sources)]
            yield start, [(int(sources[a]), positions[a:b]) for a, b in zip(edges, edges[1:])]


def mix(groups: list[Order], weights: list[float], seed: int) -> Order:
    """Resample datasets to the given shares of the total row count (repeating small ones)."""
    if not weights:
        return Order.joined(groups)
    total = sum(len(g) for g in groups)
    rng = random.Random(seed)
    parts = []
    for group, weight in zip(groups, weights):
        want = round(total * weight / sum(weights))
        if not len(group):
            continue
        repeats, rest = divmod(want, len(group))
        picked = np.array(rng.sample(range(len(group)), rest), dtype=np.int64)
        parts.append(group.take(np.concatenate([np.tile(np.arange(len(group)), repeats), picked])))
    return Order.joined(parts)


def split_rows(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation rows; the same seed always gives the same split."""
    if ratio <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * ratio)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def split(rows: Order, ratio: float, seed: int) -> tuple[Order, Order]:
    if ratio <= 0 or len(rows) < 2:  # nothing held out: no list of every index
        return rows, Order.joined([])
    train, val = split_rows(len(rows), ratio, seed)
    return rows.take(np.array(train, dtype=np.int64)), rows.take(np.array(val, dtype=np.int64))
