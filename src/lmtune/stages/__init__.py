"""Training stages: each says how examples become batches and what loss they give.

The stages the loop runs today are pt and sft; rm, dpo and ppo are refused
with a clear error until they land.
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
    raise StageNotAvailable(
        f"stage: {stage} is not available in this version of lmtune yet; pt and sft train today"
    )
