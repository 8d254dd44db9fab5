"""From a YAML/JSON file and `--set` overrides to a validated Config.

Every value keeps where it came from (default, file, an alias, an override),
and every mistake becomes one `Problem` line that names the key and the fix.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from ..errors import UserError

from . import aliases
from .problem import Problem
from .schema import GROUPS, KEY_GROUP, Config, field_info


@dataclass
class Source:
    """Where a setting's value came from."""

    origin: str  # "default", "file", "alias", "override"
    name: str  # the key as the user wrote it
    tool: str = ""

    def __str__(self) -> str:
        if self.origin == "alias":
            return f"alias {self.name} ({self.tool})" if self.tool else f"alias {self.name}"
        if self.origin == "override":
            return f"--set {self.name}"
        return self.origin


@dataclass
class Resolved:
    config: Optional[Config]
    sources: dict[str, Source] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    path: Optional[str] = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    def was_set(self, key: str) -> bool:
        return key in self.sources and self.sources[key].origin != "default"


class ConfigError(UserError):
    """Raised where a caller needs a valid config and there is none."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        text = "; ".join(f"{p.key}: {p.message}" for p in problems)
        super().__init__(text or "the config has errors (listed above); `lmtune check CONFIG` shows everything")


MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_VALUES = 100_000  # after YAML aliases are expanded: a few hundred settings need far fewer


class StrictLoader(yaml.SafeLoader):
    """YAML (and JSON, a subset of it) where a key written twice in one mapping is an error, not the last one wins."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then a key of its own overrides it, as YAML means
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if first is not None:
                    where = f"lines {first} and {line}" if first != line else f"both on line {line}"
                    raise yaml.constructor.ConstructorError(
                        None, None, f"`{key}` is set twice ({where}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _too_many_values(data: Any) -> bool:
    """More values than any config holds once aliases are expanded (a 'billion laughs' file), or a cycle."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def short(value: Any, limit: int = 80) -> str:
    """A value as a message shows it: its repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]" if text[:1] == "[" else text[: limit - 4] + " ..."


def read_file(path: str | Path) -> tuple[dict[str, Any], list[Problem]]:
    """Parse a config file; syntax errors come back as problems with line and column."""
    path = Path(path)
    if path.is_dir():
        return {}, [Problem("error", str(path), "is a folder; give the config file (.yaml or .json) inside it")]
    if not path.is_file():
        return {}, [Problem("error", str(path), "no such config file; check the path")]
    if path.stat().st_size > MAX_CONFIG_BYTES:
        return {}, [Problem("error", str(path), f"is {path.stat().st_size:,} bytes; a config is a page of settings "
                                                 f"(at most {MAX_CONFIG_BYTES:,} bytes): is this the dataset?")]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        return {}, [Problem("error", str(path), f"not UTF-8 text (byte {exc.start}); save the config as UTF-8 YAML or JSON")]
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader: no Python objects are built)
    except RecursionError:
        return {}, [Problem("error", str(path), "nested too deeply to be a config; write the settings as `key: value` lines")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if "is set twice" in reason:
            return {}, [Problem("error", str(path), f"{where}: {reason}")]
        return {}, [Problem("error", str(path), f"not valid YAML at {where}: {reason}; fix the syntax there")]
    if data is None:
        return {}, [Problem("error", str(path), "the file is empty; write at least `base_model:` and `dataset:`")]
    if not isinstance(data, dict):
        return {}, [Problem("error", str(path), "the file must be a mapping of `key: value` lines")]
    if _too_many_values(data):
        return {}, [Problem("error", str(path), f"expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors and "
                                                 "aliases repeated, or one that holds itself); write the settings out")]
    return data, []


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def coerce_string(value: Any) -> Any:
    """Undo how SageMaker passes hyperparameters: every value a string, some JSON-quoted."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in ("None", "none", "null", "Null", "NULL", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return coerce_string(json.loads(text))
        except json.JSONDecodeError:
            return value
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def _is_optional(key: str) -> bool:
    info = field_info(key)
    return info.default is None


def _suggest(name: str) -> str:
    import difflib  # only for mistakes: keeps `lmtune check` on a good config fast

    close = difflib.get_close_matches(name, aliases.every_known_name(), n=1, cutoff=0.6)
    if close:
        target = close[0]
        return f"did you mean `{target}`?"
    return "run `lmtune explain` for the list of settings"


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    return str(a).strip().lower() == str(b).strip().lower()


class _Assignments:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.sources: dict[str, Source] = {}
        self.problems: list[Problem] = []

    def put(self, key: str, value: Any, source: Source) -> None:
        if value is False and _is_optional(key) and bool not in typing.get_args(field_info(key).annotation):
            value = None  # torchtune writes `resume_from_checkpoint: False` for "none"
        if value is None and not _is_optional(key):
            if source.origin == "override":  # `--set lora_target=`: on a command line, an empty value is a slip
                self.problems.append(Problem("error", key, f"`--set {source.name}=` gives no value; give one, or leave the --set out"))
            return  # an empty key in Axolotl/LLaMA-Factory files means "default"
        if key in self.values and source.origin != "override":
            earlier = self.sources[key]
            old = self.values[key]
            # `finetuning_type: lora` with `quantization_bit: 4` or `load_in_4bit` means qlora.
            if key == "method" and {str(old), str(value)} == {"lora", "qlora"}:
                self.values[key] = "qlora"
                return
            if not _same(old, value):
                self.problems.append(
                    Problem(
                        "error",
                        key,
                        f"set twice with different values: `{earlier.name}` gives {short(old)}, "
                        f"`{source.name}` gives {short(value)}; keep one of them",
                    )
                )
            return
        self.values[key] = value
        self.sources[key] = source

    def take(self, name: str, value: Any, origin: str) -> None:
        """One key as the user wrote it: an lmtune key, a foreign name, or a mistake."""
        value = coerce_string(value)
        if name in KEY_GROUP:
            self.put(name, value, Source(origin, name))
        elif name in aliases.TRANSLATIONS:
            tool = aliases.TOOL_LABEL.get(aliases.TRANSLATION_TOOL[name], aliases.TRANSLATION_TOOL[name])
            try:
                translated = aliases.TRANSLATIONS[name](value)
            except (aliases.AliasError, ValueError, TypeError) as exc:
                self.problems.append(Problem("error", name, str(exc).split(": ", 1)[-1]))
                return
            if aliases.WARNING in translated:
                self.problems.append(Problem("warning", name, translated.pop(aliases.WARNING)))
            for key, new in translated.items():
                self.put(key, new, Source("override" if origin == "override" else "alias", name, tool))
        elif name in aliases.RENAMES:
            key, tools = aliases.RENAMES[name]
            label = "/".join(aliases.TOOL_LABEL[t] for t in tools)
            self.put(key, value, Source("override" if origin == "override" else "alias", name, label))
        elif name in aliases.IGNORED:
            if value not in (None, "", False, [], {}):
                self.problems.append(Problem("warning", name, f"ignored: {aliases.IGNORED[name]}"))
        elif name in aliases.UNSUPPORTED:
            if value not in (None, "", False, [], {}):
                self.problems.append(Problem("error", name, aliases.UNSUPPORTED[name]))
        else:
            self.problems.append(Problem("error", name, f"unknown setting; {_suggest(name)}"))


def _apply_value_aliases(values: dict[str, Any], problems: list[Problem]) -> None:
    for key, table in aliases.VALUE_ALIASES.items():
        value = values.get(key)
        if isinstance(value, str) and value.strip().lower() in table:
            spelled = value.strip().lower()
            values[key] = table[spelled]
            note = aliases.VALUE_NOTES.get((key, spelled))
            if note:
                problems.append(Problem("note", key, f"{value} runs as {table[spelled]}: {note}"))


def _pydantic_problems(exc: ValidationError, sources: dict[str, Source]) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key = loc[1] if len(loc) > 1 else loc[0]
        named = key
        if key in sources and sources[key].name != key:
            named = f"{sources[key].name} (lmtune: {key})"
        detail = err["msg"]
        if len(loc) > 2:
            detail = f"at {'.'.join(loc[2:])}: {detail}"
        given = err.get("input")
        if not isinstance(given, (dict, list)) or len(repr(given)) < 60:
            detail += f", got {given!r}"
        problems.append(Problem("error", named, f"{detail}; run `lmtune explain {key}` for what it takes"))
    return problems


def resolve(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> Resolved:
    """Read, translate and validate a config; never raises for user mistakes."""
    raw: dict[str, Any] = dict(data or {})
    problems: list[Problem] = []
    if path is not None:
        raw, problems = read_file(path)
    # An override replaces the file's key of the same name before anything is
    # translated, so `--set attn=null` cancels a file's `attn: fa2`.
    entries: dict[str, tuple[Any, str]] = {str(name): (value, "file") for name, value in raw.items()}
    for text in overrides or []:
        try:
            name, value = parse_override(text)
        except ValueError as exc:
            problems.append(Problem("error", text, str(exc)))
            continue
        entries.pop(name, None)
        entries[name] = (value, "override")
    assigned = _Assignments()
    for name, (value, origin) in entries.items():
        assigned.take(name, value, origin)
    problems += assigned.problems
    _apply_value_aliases(assigned.values, problems)

    nested: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for key, value in assigned.values.items():
        nested[KEY_GROUP[key]][key] = value
    sources = {key: assigned.sources.get(key, Source("default", key)) for key in KEY_GROUP}

    where = str(path) if path else None
    try:
        config = Config.model_validate(nested)
    except ValidationError as exc:
        return Resolved(None, sources, problems + _pydantic_problems(exc, sources), where)
    if any(p.level == "error" for p in problems):
        return Resolved(None, sources, problems, where)

    from .rules import check_rules  # rules need the validated config

    resolved = Resolved(config, sources, problems, where)
    resolved.problems += check_rules(resolved)
    return resolved


def missing_essentials(config: Config) -> list[Problem]:
    """What `train` could not start without: a model and training data, unless a SageMaker job provides them."""
    import os

    out = []
    if config.model.base_model is None and not os.environ.get("SM_CHANNEL_MODEL"):
        out.append(Problem("error", "base_model", "no model given; set base_model to a folder, a hub id or builtin:tiny"))
    if not config.data.dataset and not os.environ.get("SM_CHANNEL_TRAIN"):
        out.append(Problem("error", "dataset", "no training data given; set dataset to a file, a folder or a hub id"))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A valid Config, or ConfigError with every problem."""
    resolved = resolve(path, overrides)
    if resolved.errors or resolved.config is None:
        raise ConfigError(resolved.errors)
    return resolved.config
