"""ppo's rollouts: sampled answers, and what the policy, reference and value head say of them.

A rollout batch holds its prompts left-padded to one width, so every answer
starts in the same column; answers are right-padded after their stop token.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ...generate import stop_ids
from ...losses import uses_plain_head


class PolicyAndValue(torch.nn.Module):
    """The policy (a causal LM, or its PEFT wrapper) and a scalar value head read from its last hidden state."""

    def __init__(self, policy: Any, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the rewards
        torch.nn.init.zeros_(self.value_head.bias)


@dataclass
class Rollout:
    """One micro batch of prompts and the answers sampled for them."""

    input_ids: torch.Tensor  # prompts (left-padded) then answers (right-padded)
    attention_mask: torch.Tensor
    prompt_width: int
    answer_mask: torch.Tensor  # batch x answer width: 1 on answer tokens (the stop token included)
    old_logps: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    @property
    def answers(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width :]

    def to(self, device: Any) -> "Rollout":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Rollout(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def sample_answers(
    policy: Any, tokenizer: Any, prompts: list[list[int]], generation: Any, device: torch.device, synced: bool = False
) -> Rollout:
    """Sample one answer per prompt with the KV cache (always sampling: ppo learns from what it tries).

    No top-k cut: the log-probabilities, ratios and KL are computed on the whole
    distribution, and answers drawn from only its top tokens would bias them (the
    KL to the reference would come out several times too large). `top_p` is
    honoured as set; `check` warns below 1 for the same reason. `synced`: a sharded
    policy, whose processes must run the same number of forward passes.
    """
    pad = tokenizer.pad_token_id
    ids, mask = left_padded(prompts, pad)
    stops = stop_ids(tokenizer, policy)
    output = policy.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=generation.max_new_tokens,
        do_sample=True,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=0,
        eos_token_id=stops,
        pad_token_id=pad,
        use_cache=True,
        synced_gpus=synced,
    )
    answers = output[:, ids.shape[1] :]
    is_stop = torch.isin(answers, torch.tensor(stops, device=answers.device))
    # Answer tokens: everything up to and including the first stop token.
    after_stop = (is_stop.long().cumsum(1) - is_stop.long()) > 0
    answer_mask = (~after_stop).long()
    answers = answers.masked_fill(after_stop, pad)
    return Rollout(
        input_ids=torch.cat([ids.to(device), answers], 1),
        attention_mask=torch.cat([mask.to(device), answer_mask], 1),
        prompt_width=ids.shape[1],
        answer_mask=answer_mask,
    )


def answer_logits_and_hidden(model: Any, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting each answer token, the last hidden state at the same positions)."""
    mask = rollout.attention_mask
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    start, width = rollout.prompt_width - 1, rollout.answers.shape[1]
    inputs = {"input_ids": rollout.input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": False}
    if uses_plain_head(model):  # the head on answer positions only
        hidden = model.get_decoder()(**inputs).last_hidden_state[:, start : start + width]
        return model.get_output_embeddings()(hidden), hidden
    out = model(**inputs, output_hidden_states=True)
    return out.logits[:, start : start + width], out.hidden_states[-1][:, start : start + width]


def token_statistics(
    model: Any, value_head: Optional[torch.nn.Module], rollout: Rollout, temperature: float, with_entropy: bool = True
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(log-probability of each answer token, the entropy there, the value there), under the sampling temperature."""
    logits, hidden = answer_logits_and_hidden(model, rollout)
    logps_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logps = logps_all.gather(-1, rollout.answers.unsqueeze(-1)).squeeze(-1)
    entropy = -(logps_all.exp() * logps_all).sum(-1) if with_entropy else None
    values = None
    if value_head is not None:
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()
    return logps, entropy, values
