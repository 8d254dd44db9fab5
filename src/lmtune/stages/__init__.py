"""Training stages: each says how examples become batches and what loss they give.

The shared loop (engine/loop.py) runs pt and sft (causal_lm), rm (reward) and
dpo (preference). ppo alternates rollouts with updates, so it has its own
recipe in ppo/, built from the same engine parts.
"""

from __future__ import annotations

from typing import Any

from ..config.schema import Config
from ..errors import UserError


class StageNotAvailable(UserError, ValueError):
    """A stage that has no fixed-dataset loss (ppo learns from its own rollouts)."""


def stage_for(config: Config) -> Any:
    stage = config.finetuning.stage
    if stage in ("pt", "sft"):
        from .causal_lm import CausalLM

        return CausalLM()
    if stage == "rm":
        from .reward import RewardModel

        return RewardModel()
    if stage == "dpo":
        from .preference import Preference

        return Preference(config)
    raise StageNotAvailable(
        f"stage: {stage} has no loss on fixed data to evaluate; its runs log eval_reward_mean "
        "(fresh answers to the validation prompts) in metrics.jsonl"
    )
