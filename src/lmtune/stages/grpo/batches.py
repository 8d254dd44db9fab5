"""grpo's training micro batches: sampled answers after their prompts, and what the loss reads of them.

Three layouts, the same log-probabilities: each group's prompt computed once with its answers as branches
(lmtune's packed attention), every answer after its own copy of the prompt in one padding-free row, or padded
rows. Either way the loss gets one value per answer token, answer after answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...data.batches import IGNORE, packed_batch, pad_batch
from ...losses import listed_target_losses, token_losses


@dataclass
class Answer:
    """One sampled answer: the prompt it continues (its row among the training prompts), its tokens and rewards."""

    row: int
    prompt: list[int]
    tokens: list[int]
    truncated: bool
    rewards: list[float]  # one per reward source
    reward: float = 0.0  # weighted sum
    advantage: float = 0.0


def shared_prompt_batch(answers: Sequence[Answer]) -> dict[str, torch.Tensor]:
    """Each run of answers to one prompt as one segment: the prompt once, then its answers as branches (the first
    continues the prompt, each later one sees the prompt and itself, positions continuing from the prompt)."""
    ids: list[int] = []
    positions: list[int] = []
    bounds, branches = [0], []
    targets: list[int] = []
    rows: list[int] = []
    runs: list[list[Answer]] = []
    for answer in answers:
        if runs and runs[-1][0].row == answer.row and runs[-1][0].prompt is answer.prompt:
            runs[-1].append(answer)
        else:
            runs.append([answer])
    for run in runs:
        prompt, start = run[0].prompt, bounds[-1]
        ids += prompt
        positions += range(len(prompt))
        starts = []
        for index, answer in enumerate(run):
            at = len(ids) - start  # where this answer begins in the segment
            if index:
                starts.append(at)
            for offset, token in enumerate(answer.tokens):
                targets.append(token)
                # The first token of an answer is predicted by the prompt's last row.
                rows.append(start + len(prompt) - 1 if offset == 0 else start + at + offset - 1)
            ids += answer.tokens
            positions += range(len(prompt), len(prompt) + len(answer.tokens))
        branches.append([len(prompt), *starts])
        bounds.append(len(ids))
    width = max(len(b) for b in branches)
    return {
        "input_ids": torch.tensor(ids)[None],
        "position_ids": torch.tensor(positions)[None],
        "cu_seq_lens": torch.tensor(bounds),
        "prompt_branches": torch.tensor([b + [-1] * (width - len(b)) for b in branches]),
        "target_ids": torch.tensor(targets),
        "target_rows": torch.tensor(rows),
    }


def sequence_batch(answers: Sequence[Answer], packing: bool, pad_id: int) -> dict[str, torch.Tensor]:
    sequences = [{"input_ids": a.prompt + a.tokens, "labels": [IGNORE] * len(a.prompt) + a.tokens} for a in answers]
    return packed_batch(sequences) if packing else pad_batch(sequences, pad_id)


def collate(answers: Sequence[Answer], packing: bool, share_prompts: bool, pad_id: int) -> dict[str, torch.Tensor]:
    batch = shared_prompt_batch(answers) if packing and share_prompts else sequence_batch(answers, packing, pad_id)
    batch["answer_lengths"] = torch.tensor([len(a.tokens) for a in answers])
    return batch


def answer_token_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log pi of every answer token, answer after answer, under the sampling temperature."""
    if "target_rows" in batch:
        return -listed_target_losses(model, batch, temperature)
    return -token_losses(model, batch, temperature)[0]
