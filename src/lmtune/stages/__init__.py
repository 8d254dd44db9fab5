"""The stage registry: every stage lmtune trains, by the name `stage:` takes.

A stage is one module (stages/base.py says what it declares). The engine runs
`stage.recipe()` when the stage has its own loop, else the shared loop with
`stage.objective(config)`; the config rules run `stage.rules`; the data step
keeps the record kinds in `stage.reads`. Adding a stage is its module and a
line below. Nothing here imports torch: `check` and `explain` read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from .base import Objective, Stage  # noqa: F401  (Objective: the type the engine runs)
from .causal_lm import PT, SFT
from .grpo import GRPO
from .kto import KTO_STAGE
from .ppo import PPO
from .preference import DPO
from .reward import RM

if TYPE_CHECKING:
    from ..config.schema import Config

STAGES: dict[str, Stage] = {stage.name: stage for stage in (PT, SFT, RM, DPO, KTO_STAGE, PPO, GRPO)}


class StageNotAvailable(UserError, ValueError):
    """A stage that has no loss on fixed data (ppo learns from its own rollouts)."""


def stage_of(config: "Config") -> Stage:
    return STAGES[config.finetuning.stage]


def objective_for(config: "Config") -> Objective:
    """The loss on fixed data of the config's stage (training, `lmtune eval`)."""
    stage = stage_of(config)
    if not stage.evaluates_on_data:
        raise StageNotAvailable(
            f"stage: {stage.name} has no loss on fixed data to evaluate; its runs log eval_reward_mean "
            "(fresh answers to the validation prompts) in metrics.jsonl"
        )
    return stage.objective(config)
