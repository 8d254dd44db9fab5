"""Where ppo's scores come from: a reward model trained by an `rm` run, or a Python function."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .reward_spec import RewardSpecError, reward_function_parts


class FunctionReward:
    """`reward_function: file.py:name`, called with the prompts and answers as text."""

    def __init__(self, spec: str, base: Optional[Path]):
        path, name = reward_function_parts(spec, base)
        module_spec = importlib.util.spec_from_file_location(f"lmtune_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # the user's own file, named in their config
        function = getattr(module, name, None)
        if not callable(function):
            raise RewardSpecError(f"reward_function: {path} has no function `{name}`")
        self.function: Callable[[list[str], list[str]], Any] = function
        self.spec = spec

    def __call__(self, prompts: list[str], answers: list[str], sequences: list[list[int]]) -> torch.Tensor:
        values = self.function(prompts, answers)
        try:
            scores = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardSpecError(f"reward_function: {self.spec} must return a list of numbers, one per answer") from None
        if len(scores) != len(answers) or not all(math.isfinite(v) for v in scores):
            raise RewardSpecError(
                f"reward_function: {self.spec} returned {len(scores)} values for {len(answers)} answers"
                " (one finite number per answer is needed)"
            )
        return torch.tensor(scores, dtype=torch.float32)


class ModelReward:
    """A reward model: an `rm` run's final/ (full model or PEFT adapter with its head) or a model folder."""

    def __init__(self, location: str, policy_tokenizer: Any, device: torch.device):
        from ...generate import RunNotFound
        from ...score import load_reward_model

        try:
            model, tokenizer, _ = load_reward_model(location)
        except RunNotFound as error:
            raise RewardSpecError(f"reward_model: {error}") from None
        if tokenizer.get_vocab() != policy_tokenizer.get_vocab():
            raise RewardSpecError(
                f"reward_model: {location} uses a different vocabulary from base_model; "
                "train the reward model from the same base (or a model with the same tokenizer)"
            )
        self.model = model.to(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __call__(self, prompts: list[str], answers: list[str], sequences: list[list[int]]) -> torch.Tensor:
        from ...score import score_sequences

        return torch.tensor(score_sequences(self.model, sequences, self.pad_id), dtype=torch.float32)


def reward_source(config: Any, config_dir: Optional[Path], policy_tokenizer: Any, device: torch.device) -> Any:
    f = config.finetuning
    if f.reward_function:
        return FunctionReward(f.reward_function, config_dir)
    return ModelReward(f.reward_model, policy_tokenizer, device)
