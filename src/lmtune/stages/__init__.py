"""Training stages: each says how examples become batches and what loss they give.

The loop runs pt and sft (causal_lm), rm (reward) and dpo (preference); ppo
is refused with a clear error until it lands.
"""

from __future__ import annotations

from typing import Any

from ..config.schema import Config
from ..errors import UserError


class StageNotAvailable(UserError, ValueError):
    """A stage the schema knows that this version cannot train yet."""


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
        f"stage: {stage} is not available in this version of lmtune yet; pt, sft, rm and dpo train today"
    )
