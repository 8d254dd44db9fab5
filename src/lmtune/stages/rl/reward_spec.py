"""`reward_function` and `reward_model` settings, read without running or loading anything (for `lmtune check`)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

from ...config.problem import Problem
from ...errors import UserError

BUILTIN_REWARDS = ("exact_match", "format")  # grpo's rewards that need no code (rl/rewards.py)


class RewardSpecError(UserError, ValueError):
    """A reward_function or reward_model setting that cannot be used."""


def reward_function_parts(spec: str, base: Optional[Path]) -> tuple[Path, str]:
    """(the file, the function's name); relative files are read from the config's folder."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise RewardSpecError(f"reward_function: {spec!r} is not `path/to/file.py:function_name`")
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    if not path.is_file():
        raise RewardSpecError(f"reward_function: the file {path_text} does not exist (relative paths are read from the config's folder)")
    if path.suffix != ".py":
        raise RewardSpecError(f"reward_function: {path_text} is not a Python file; name a .py file and a function in it (file.py:name)")
    return path, name


def check_reward_function(spec: str, base: Optional[Path]) -> None:
    """The file parses and defines `name` at its top level (a def, or an assignment)."""
    path, name = reward_function_parts(spec, base)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as error:
        raise RewardSpecError(f"reward_function: {path} is not valid Python ({error.__class__.__name__}: {error})") from None
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
    if name not in defined:
        raise RewardSpecError(f"reward_function: {path} defines no `{name}`; name a function defined at the top of that file")


def reward_entries(value: object) -> list[str]:
    """`reward_function` as a list: one entry, or several (grpo)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[union-attr]


def reward_function_problems(entries: list[str], base: Optional[Path], builtins: tuple[str, ...] = ()) -> list[Problem]:
    out = []
    for entry in entries:
        if entry in builtins:
            continue
        try:
            check_reward_function(entry, base)
        except RewardSpecError as error:
            out.append(Problem("error", "reward_function", str(error).removeprefix("reward_function: ")))
    return out


def reward_model_problems(given: str, base: Optional[Path]) -> list[Problem]:
    """The reward model exists (or may be a hub id), and is an rm run when lmtune wrote it."""
    location = Path(given).expanduser()
    if not location.is_absolute() and base is not None and (base / location).exists():
        location = base / location
    if not location.exists():
        if given.startswith((".", "/", "~")):
            return [Problem("error", "reward_model", f"{given} does not exist; give an rm run's output_dir")]
        if given.count("/") > 1:  # not a hub id either; it may exist where training runs
            return [Problem("warning", "reward_model", f"{given} does not exist here; training needs it")]
    meta = location / "final" / "lmtune.json" if (location / "final").is_dir() else location / "lmtune.json"
    if meta.exists():
        import json

        stage = json.loads(meta.read_text()).get("stage")
        if stage != "rm":
            return [Problem("error", "reward_model", f"{given} was trained with stage: {stage}; a reward model is an rm run")]
    return []
