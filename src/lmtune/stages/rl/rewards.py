"""Where the RL stages' scores come from: Python functions, built-in verifiable rewards, or a reward model.

A function (`reward_function: file.py:name`) gets the prompts and answers as text; written TRL's way (a
`completions` parameter or `**kwargs`) it is called with keywords, and grpo passes each row's other
columns too (`answer=[...]`). Built-in rewards need no code: `exact_match` compares the answer's final
result (a `\\boxed{}` answer, else its last number) with a column, `format` checks the answer against a
regular expression. Every score must be a finite number, one per answer; anything else stops the run
with one line naming the reward and the row.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .reward_spec import RewardSpecError, reward_entries, reward_function_parts


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

        parameters = inspect.signature(function).parameters.values()
        self.by_keyword = any(p.kind is p.VAR_KEYWORD or p.name == "completions" for p in parameters)

    def __call__(self, prompts: list[str], answers: list[str], sequences: list[list[int]],
                 columns: Optional[dict[str, list[Any]]] = None, rows: Optional[list[int]] = None) -> torch.Tensor:
        try:
            if self.by_keyword:
                values = self.function(prompts=prompts, completions=answers, **(columns or {}))
            else:
                values = self.function(prompts, answers)
        except Exception as error:  # the user's code: its failure is named, not a traceback of ours
            where = f" (on the prompts of rows {', '.join(str(r + 1) for r in sorted(set(rows)))})" if rows else ""
            raise RewardSpecError(f"reward_function: {self.spec} raised {type(error).__name__}: {error}{where}") from None
        return checked_scores(self.spec, values, len(answers), rows)


def checked_scores(name: str, values: Any, count: int, rows: Optional[list[int]] = None) -> torch.Tensor:
    """One finite number per answer, or one line naming the reward and the first bad row."""
    try:
        scores = [float(v) for v in values]
    except (TypeError, ValueError):
        raise RewardSpecError(f"reward_function: {name} must return a list of numbers, one per answer") from None
    if len(scores) != count:
        raise RewardSpecError(f"reward_function: {name} returned {len(scores)} values for {count} answers (one number per answer is needed)")
    bad = next((i for i, v in enumerate(scores) if not math.isfinite(v)), None)
    if bad is not None:
        row = f", the answer to the prompt of row {rows[bad] + 1}" if rows else ""
        raise RewardSpecError(f"reward_function: {name} returned {scores[bad]} for answer {bad + 1}{row}; return a finite number")
    return torch.tensor(scores, dtype=torch.float32)


BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> Optional[str]:
    """The result a text ends with: its last `\\boxed{}` content, else its last number; normalised (no commas,
    no trailing zeros after a decimal point, no spaces, lower case)."""
    boxed = BOXED.findall(text)
    found = boxed[-1] if boxed else (NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    value = found.replace(",", "").replace(" ", "").strip().lower().removeprefix("$").removesuffix("$")
    if re.fullmatch(r"-?\d+\.\d*", value):
        value = value.rstrip("0").rstrip(".")
    return value


class ExactMatch:
    """1 when the answer's final result equals the reference column's (GSM8K's `#### 42` reads as 42), else 0."""

    def __init__(self, column: str):
        self.column, self.spec = column, "exact_match"

    def __call__(self, prompts: list[str], answers: list[str], sequences: list[list[int]],
                 columns: Optional[dict[str, list[Any]]] = None, rows: Optional[list[int]] = None) -> torch.Tensor:
        references = (columns or {}).get(self.column)
        if references is None:
            raise RewardSpecError(f"reward_function: exact_match reads the column `{self.column}`, which the rows lack; "
                                  "set reward_answer_column to the column holding the reference answers")
        scores = []
        for answer, reference in zip(answers, references):
            wanted = final_answer(str(reference))
            scores.append(float(wanted is not None and final_answer(answer) == wanted))
        return torch.tensor(scores, dtype=torch.float32)


class FormatReward:
    """1 when the whole answer matches the pattern (dots match newlines too), else 0."""

    def __init__(self, pattern: str):
        self.pattern, self.spec = re.compile(pattern, re.DOTALL), "format"

    def __call__(self, prompts: list[str], answers: list[str], sequences: list[list[int]],
                 columns: Optional[dict[str, list[Any]]] = None, rows: Optional[list[int]] = None) -> torch.Tensor:
        return torch.tensor([float(self.pattern.fullmatch(a.strip()) is not None) for a in answers], dtype=torch.float32)


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

        self.spec = "reward_model"

    def __call__(self, prompts: list[str], answers: list[str], sequences: list[list[int]],
                 columns: Optional[dict[str, list[Any]]] = None, rows: Optional[list[int]] = None) -> torch.Tensor:
        from ...score import score_sequences

        return torch.tensor(score_sequences(self.model, sequences, self.pad_id), dtype=torch.float32)


def reward_source(config: Any, config_dir: Optional[Path], policy_tokenizer: Any, device: torch.device) -> Any:
    """ppo's one reward."""
    f = config.finetuning
    if f.reward_function:
        return FunctionReward(reward_entries(f.reward_function)[0], config_dir)
    return ModelReward(f.reward_model, policy_tokenizer, device)


def reward_sources(config: Any, config_dir: Optional[Path], policy_tokenizer: Any, device: torch.device) -> list[Any]:
    """grpo's rewards, in the order `reward_weights` weighs them: each `reward_function` entry, then the reward model."""
    f = config.finetuning
    sources: list[Any] = []
    for entry in reward_entries(f.reward_function):
        if entry == "exact_match":
            sources.append(ExactMatch(f.reward_answer_column))
        elif entry == "format":
            sources.append(FormatReward(f.format_pattern))
        else:
            sources.append(FunctionReward(entry, config_dir))
    if f.reward_model:
        sources.append(ModelReward(f.reward_model, policy_tokenizer, device))
    return sources
