"""`reward_function: path/to/file.py:name`, read without running it (for `lmtune check`)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

from ...errors import UserError


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
