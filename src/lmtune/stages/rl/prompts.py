"""Prompts for the RL stages: the prompt side of any row, and which prompts an iteration rolls out."""

from __future__ import annotations

import random
from typing import Any


def as_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """A chat's last answer, or a pair's answers, are what the policy must write: keep the prompt side, and the
    row's other columns. A chat's dropped answer stays as the column `answer` when the row has none."""
    if record["kind"] == "prompt":
        return record
    if record["kind"] in ("preference", "unpaired"):
        return {"kind": "prompt", "messages": record["messages"]}
    columns = dict(record.get("columns", {}))
    messages = record["messages"]
    if messages[-1]["role"] == "assistant":
        columns.setdefault("answer", messages[-1]["content"])
        messages = messages[:-1]
    return {"kind": "prompt", "messages": messages, **({"columns": columns} if columns else {})}


def prompt_order(count: int, seed: int, epoch: int) -> list[int]:
    """The same shuffled order of prompts for an epoch whatever the run was interrupted by."""
    order = list(range(count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def prompts_for(iteration: int, per_iteration: int, count: int, seed: int) -> list[int]:
    """The indices of the prompts iteration `iteration` rolls out (epochs follow each other)."""
    out = []
    start = iteration * per_iteration
    for position in range(start, start + per_iteration):
        epoch, index = divmod(position, count)
        out.append(prompt_order(count, seed, epoch)[index])
    return out
