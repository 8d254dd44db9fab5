"""ppo: reinforcement learning from a reward, with rollouts, a value head and a KL leash.

This module is the stage as `check` and `explain` see it (its settings, rules and
data); its recipe (train.py) alternates rollouts with optimisation epochs over
them, so it has its own loop built from the engine's shared parts (engine/run.py):
- rewards.py: where scores come from (an rm run, or a Python function);
- rollout.py: prompts in order, answers sampled with the KV cache, per-token
  log-probabilities, entropies and values;
- objective.py: the KL penalty, GAE, clipped policy and value losses, the
  adaptive KL coefficient and running reward statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from ...config.fields import Group, setting
from ...config.problem import Problem
from ..base import Stage
from ..rl.prompts import as_prompt
from ..rl.reward_spec import reward_entries, reward_function_problems, reward_model_problems

if TYPE_CHECKING:
    from ...config.load import Resolved
    from ...config.schema import Config


class PPOArgs(Group):
    reward_model: Optional[str] = setting(
        None,
        "With `ppo` (or as one of `grpo`'s rewards): the reward model (a run folder of an `rm` stage, or a model "
        "path) that scores the policy's answers.",
        llamafactory=("reward_model",),
    )
    ppo_epochs: int = setting(
        4,
        "With `ppo`: optimisation passes over each batch of rollouts.",
        ge=1,
        llamafactory=("ppo_epochs",),
    )
    ppo_buffer_size: int = setting(
        1,
        "With `ppo`: rollout batches collected before each optimisation phase.",
        ge=1,
        llamafactory=("ppo_buffer_size",),
    )
    ppo_kl_coef: float = setting(
        0.05,
        "With `ppo`: weight of the KL penalty to the reference model in the reward.",
        ge=0.0,
    )
    ppo_clip_range: float = setting(
        0.2,
        "With `ppo`: how far one update may move the policy's probability ratio.",
        gt=0.0,
    )
    ppo_target_kl: Optional[float] = setting(
        None,
        "With `ppo`: make `ppo_kl_coef` adaptive, steering the KL to the reference "
        "towards this value per answer (raised when the KL is above, lowered below).",
        gt=0.0,
        llamafactory=("ppo_target",),
    )
    reward_function: Union[str, list[str], None] = setting(
        None,
        "With `ppo` and `grpo`: a rule-based reward instead of `reward_model`: `path/to/file.py:name`, a function "
        "called with the prompts and the answers (lists of strings) that returns one float per answer. grpo takes a "
        "list, weighed by `reward_weights`, which may name the built-in rewards `exact_match` and `format`.",
    )
    ppo_gamma: float = setting(
        1.0,
        "With `ppo`: discount of later rewards in the advantage estimate.",
        gt=0.0,
        le=1.0,
    )
    ppo_lam: float = setting(
        0.95,
        "With `ppo`: GAE lambda; how far the advantage estimate looks ahead before trusting the value head.",
        more="Less bias, more variance.",
        less="More reliance on the value head; less variance.",
        ge=0.0,
        le=1.0,
    )
    ppo_value_clip: float = setting(
        0.2,
        "With `ppo`: how far one update may move the value head's estimates from the rollout's.",
        gt=0.0,
    )
    ppo_value_coef: float = setting(
        0.1,
        "With `ppo`: weight of the value head's loss beside the policy's.",
        ge=0.0,
    )
    ppo_score_norm: bool = setting(
        False,
        "With `ppo`: normalise rewards by the running mean and standard deviation of all rewards seen.",
        llamafactory=("ppo_score_norm",),
    )



def reward_problems(r: "Resolved") -> list[Problem]:
    """Exactly one reward source, and one that exists."""
    c = r.config.finetuning
    entries = reward_entries(c.reward_function)
    if not c.reward_model and not entries:
        fix = "train a reward model with stage: rm and set reward_model to its folder, or set reward_function: file.py:name"
        return [Problem("error", "reward_model", f"stage ppo needs a reward: {fix}")]
    if (c.reward_model and entries) or len(entries) > 1:
        named = "reward_model, reward_function" if c.reward_model else "reward_function"
        return [Problem("error", named, "stage ppo takes one reward source; keep one (grpo weighs several)")]
    base = Path(r.path).resolve().parent if r.path else None
    if entries:
        return reward_function_problems(entries, base)
    return reward_model_problems(c.reward_model, base)


class ProximalPolicyOptimisation(Stage):
    name = "ppo"
    streams = False  # its prompts are drawn in its own order
    summary = "reinforcement learning against a reward model or a reward function"
    reads = frozenset({"prompt", "chat", "preference", "unpaired"})
    settings = PPOArgs
    packs = False  # rollouts are left-padded prompts and sampled answers
    unit = "answer tokens"  # what the run counts (its summary's rate); each iteration also logs answers_per_second
    evaluates_on_data = False

    def rules(self, r: "Resolved") -> list[Problem]:
        d = r.config.data
        out = reward_problems(r)
        if r.config.generation.top_p < 1.0:
            out.append(Problem("warning", "top_p", "ppo samples rollouts from the whole distribution; below 1 the KL estimate and ratios are biased"))
        if d.dataset_format == "text":
            out.append(Problem("error", "dataset_format", "stage ppo needs prompts (prompt, instruction, chat or preference rows), not raw text"))
        if d.packing is True:
            out.append(Problem("error", "packing", "packing lays out fixed data, not ppo's rollouts; set packing: false"))
        return out

    def record(self, record: dict[str, Any], which: str, number: int, config: "Config") -> dict[str, Any]:
        return as_prompt(record)

    recipe = "lmtune.stages.ppo.train:train_ppo"


PPO = ProximalPolicyOptimisation()
