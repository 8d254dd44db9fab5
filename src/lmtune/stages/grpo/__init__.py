"""grpo: reinforcement learning with verifiable rewards, from groups of sampled answers (no value model).

This module is the stage as `check` and `explain` see it; its recipe (train.py) samples `num_generations`
answers per prompt (stages/rl/sampling.py), scores them with reward functions, and learns from each
answer's reward relative to its group's (loss.py: GRPO, Dr. GRPO, DAPO, BNPO, GSPO).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from ...config.fields import Group, setting
from ...config.problem import Problem
from ...data.records import DataError
from ..base import Stage
from ..rl.prompts import as_prompt
from ..rl.reward_spec import BUILTIN_REWARDS, reward_entries, reward_function_problems, reward_model_problems

if TYPE_CHECKING:
    from ...config.load import Resolved
    from ...config.schema import Config


class GRPOArgs(Group):
    num_generations: int = setting(
        8,
        "With `grpo`: answers sampled per prompt; each answer learns from its reward relative to its group's.",
        more="A better baseline per prompt and more answers per step; more sampling time.",
        less="Noisier advantages; at 1 every advantage is 0.",
        ge=1,
        axolotl=("num_generations",),
    )
    reward_weights: list[float] = setting(
        [],
        "With `grpo`: one weight per reward (each `reward_function` entry, then `reward_model`); empty weighs each 1.",
        axolotl=("reward_weights",),
    )
    scale_rewards: bool = setting(
        True,
        "With `grpo`: divide each answer's advantage by its group's reward spread (GRPO); false keeps the raw "
        "difference from the group mean (Dr. GRPO), which does not favour prompts whose answers agree.",
        axolotl=("scale_rewards",),
    )
    grpo_loss: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = setting(
        "dapo",
        "With `grpo`: how the per-token loss is averaged. `grpo` per answer then over answers (DeepSeekMath); "
        "`dapo` over every answer token of the step (DAPO); `bnpo` over the tokens of each micro batch; "
        "`dr_grpo` over answers x max_new_tokens, a constant (Dr. GRPO), so long answers are not favoured.",
        axolotl=("loss_type",),
    )
    epsilon: float = setting(
        0.2,
        "With `grpo`: how far below 1 (and above, unless `epsilon_high` is set) one update may move the "
        "probability ratio of a token (or, with `importance_sampling_level: sequence`, of an answer).",
        gt=0.0,
        axolotl=("epsilon",),
    )
    epsilon_high: Optional[float] = setting(
        None,
        "With `grpo`: the upper clip of the ratio when it differs from `epsilon` (DAPO's clip-higher; 0.28 in the "
        "paper): rare tokens that should gain can gain more.",
        gt=0.0,
        axolotl=("epsilon_high",),
    )
    num_iterations: int = setting(
        1,
        "With `grpo`: optimizer passes over each batch of sampled answers, against their sampling "
        "log-probabilities (mu in the GRPO paper).",
        ge=1,
        axolotl=("num_iterations",),
    )
    importance_sampling_level: Literal["token", "sequence"] = setting(
        "token",
        "With `grpo`: `token` clips each token's probability ratio; `sequence` uses one ratio per answer, the "
        "geometric mean of its tokens' (GSPO), usually with a much smaller epsilon (3e-4 to 4e-4).",
        axolotl=("importance_sampling_level",),
    )
    beta: float = setting(
        0.0,
        "With `grpo`: weight of the KL penalty to the reference policy per token (the k3 estimator); 0 trains "
        "without a reference. The reference is the adapter switched off with LoRA, a frozen copy otherwise.",
        ge=0.0,
        axolotl=("beta",),
    )
    mask_truncated_completions: bool = setting(
        False,
        "With `grpo`: leave answers that ran out of `max_new_tokens` before their stop token out of the loss "
        "(DAPO); they still count in their group's reward statistics.",
        axolotl=("mask_truncated_completions",),
    )
    reward_answer_column: str = setting(
        "answer",
        "With `grpo`'s `exact_match` reward: the data column holding each prompt's reference answer (its last "
        "number or `\\boxed{}` content is compared). A chat row's own answer counts when there is no such column.",
    )
    format_pattern: str = setting(
        r"<think>.+?</think>\s*\S.*",
        "With `grpo`'s `format` reward: a regular expression the whole answer must match (dots match newlines): "
        "by default a `<think>...</think>` block and then an answer.",
    )


class GroupRelative(Stage):
    name = "grpo"
    streams = False  # its prompts are drawn in its own order
    summary = "reinforcement learning from verifiable rewards, group-relative, with the DAPO, BNPO, GSPO and Dr. GRPO variants"
    reads = frozenset({"prompt", "chat", "preference", "unpaired"})
    settings = GRPOArgs
    also_uses = ("reward_function", "reward_model")
    packs = True  # its answers train padding-free, each group's prompt computed once
    unit = "answer tokens"  # what the run counts; each step also logs answers_per_second
    evaluates_on_data = False
    recipe = "lmtune.stages.grpo.train:train_grpo"

    def rules(self, r: "Resolved") -> list[Problem]:
        c, t, d = r.config.finetuning, r.config.training, r.config.data
        out = []
        entries = reward_entries(c.reward_function)
        base = Path(r.path).resolve().parent if r.path else None
        if not entries and not c.reward_model:
            out.append(Problem("error", "reward_function", "stage grpo needs a reward: set reward_function to file.py:name, "
                               f"a list of them, or a built-in reward ({', '.join(BUILTIN_REWARDS)})"))
        out += reward_function_problems(entries, base, BUILTIN_REWARDS)
        if c.reward_model:
            out += reward_model_problems(c.reward_model, base)
        rewards = len(entries) + bool(c.reward_model)
        if c.reward_weights and len(c.reward_weights) != rewards:
            out.append(Problem("error", "reward_weights", f"{len(c.reward_weights)} weights for {rewards} rewards; give one "
                               "weight per reward_function entry (and one for reward_model), or none"))
        if c.num_generations < 2:
            out.append(Problem("error", "num_generations", "1 answer per prompt leaves no group to compare with, so every "
                               "advantage is 0; use 2 or more (8 is usual)"))
        per_step = t.micro_batch_size * t.gradient_accumulation_steps
        if c.num_generations >= 2 and per_step % c.num_generations:
            out.append(Problem("error", "num_generations", f"a step trains micro_batch_size x gradient_accumulation_steps = "
                               f"{per_step} answers, not a multiple of num_generations ({c.num_generations}); make it one"))
        if c.epsilon_high is not None and c.epsilon_high < c.epsilon:
            out.append(Problem("error", "epsilon_high", f"{c.epsilon_high} is below epsilon ({c.epsilon}); the upper clip is "
                               "meant to be at least the lower one (DAPO uses 0.28 with 0.2)"))
        if d.dataset_format == "text":
            out.append(Problem("error", "dataset_format", "stage grpo needs prompts (prompt, instruction, chat or preference rows), not raw text"))
        if c.importance_sampling_level == "sequence" and c.epsilon >= 0.05:
            out.append(Problem("note", "epsilon", f"{c.epsilon} with importance_sampling_level: sequence clips little; "
                               "GSPO uses 3e-4 to 4e-4"))
        return out

    def record(self, record: dict[str, Any], which: str, number: int, config: "Config") -> dict[str, Any]:
        """The prompt side of each row, with its other columns; exact_match's reference column checked in every row."""
        record = as_prompt(record)
        f = config.finetuning
        if "exact_match" in reward_entries(f.reward_function) and f.reward_answer_column not in record.get("columns", {}):
            raise DataError(f"dataset: {which} row {number} has no `{f.reward_answer_column}` column, which the "
                            "exact_match reward compares against; add it, or set reward_answer_column")
        return record


GRPO = GroupRelative()
