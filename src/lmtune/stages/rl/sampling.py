"""Groups of answers sampled with the KV cache, each prompt computed once for its whole group.

`sample_groups` runs the prompts (left-padded) through the model once, copies
each prompt's cache to the `group` answers that continue it, and then decodes
one token per step for all answers at once, each stopping at its own stop
token. Sampling is Gumbel-max over the temperature-scaled logits (top-k and
top-p applied first): the same distribution as `generate`'s sampling, with the
noise of each prompt's group drawn from its own generator, so a group's answers
depend on its seed, not on which other prompts shared the batch (nor on how
many processes split the work).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Groups:
    """`len(prompts) x group` answers, prompt by prompt: answer token ids right-padded, the answer-token mask (the
    stop token included), and whether an answer ran out of `max_new_tokens` before its stop token."""

    answers: torch.Tensor
    answer_mask: torch.Tensor
    truncated: torch.Tensor

    def answer_ids(self) -> list[list[int]]:
        return [row[mask.bool()].tolist() for row, mask in zip(self.answers, self.answer_mask)]


def filtered(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top-k tokens, and outside the smallest set whose probability reaches top_p, set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits


def _gumbel(shape: tuple[int, int], generators: Sequence[torch.Generator], group: int, device: torch.device) -> torch.Tensor:
    noise = torch.cat([torch.rand((group, shape[1]), generator=g, dtype=torch.float32) for g in generators])
    return -torch.log(-torch.log(noise.clamp(min=1e-20, max=1 - 1e-7))).to(device)


def _forward_names(model: Any) -> tuple[str, dict[str, int]]:
    """The model's name for its KV cache argument (`cache` from transformers 5, `past_key_values` before), and
    the argument that computes logits for the last position only, where the model takes it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)
    parameters = inspect.signature(type(base).forward).parameters
    last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    return ("cache" if "cache" in parameters else "past_key_values"), last


@torch.no_grad()
def sample_groups(
    model: Any, prompts: list[list[int]], group: int, generation: Any, stops: list[int], pad_id: int,
    generators: Sequence[torch.Generator], device: torch.device, synced: bool = False,
) -> Groups:
    """`group` answers per prompt. `generators`: one per prompt; `synced`: a sharded model, whose processes must run
    the same number of forward passes (they go on until every process's answers have stopped)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache_name, last_only = _forward_names(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    cache = getattr(out, cache_name)
    cache.batch_repeat_interleave(group)
    logits = out.logits[:, -1].float().repeat_interleave(group, 0)
    mask = mask.repeat_interleave(group, 0)
    position = positions[:, -1].repeat_interleave(group, 0) + 1
    rows = logits.shape[0]
    stop = torch.tensor(stops, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    for step in range(generation.max_new_tokens):
        scores = filtered(logits / generation.temperature, generation.top_k, generation.top_p)
        token = (scores + _gumbel(tuple(scores.shape), generators, group, device)).argmax(-1)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        done = done | torch.isin(token, stop)
        if _all_done(done, synced) or step == generation.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], use_cache=True,
                    **{cache_name: cache}, **last_only)
        logits, position = out.logits[:, -1].float(), position + 1
    answers = torch.stack(tokens, 1)
    is_stop = torch.isin(answers, stop)
    after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    answer_mask = (~after_stop).long()
    return Groups(answers.masked_fill(after_stop, pad_id), answer_mask, ~is_stop.any(1))


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    if not synced:
        return bool(done.all())
    unfinished = (~done).sum().reshape(1)
    torch.distributed.all_reduce(unfinished)
    return int(unfinished) == 0


def seeded(*parts: int) -> int:
    """A seed for one piece of work (a rollout micro batch, a group, an epoch's order), the same on every process."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % 2**62
    return value


def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]
