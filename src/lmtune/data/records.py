"""Rows from the user's files, normalised to a few canonical record shapes.

Canonical records (plain dicts, cheap to pickle to workers):
- text:       {"kind": "text", "text": str}
- chat:       {"kind": "chat", "messages": [{"role", "content"}, ...]}  (instruction rows become chat)
- completion: {"kind": "completion", "prompt": str, "completion": str}   (JumpStart template.json rows)
- preference: {"kind": "preference", "messages": [...prompt turns], "chosen": str, "rejected": str}
- prompt:     {"kind": "prompt", "messages": [...]}                      (ppo and grpo prompts)
- unpaired:   {"kind": "unpaired", "messages": [...prompt turns], "completion": str, "label": bool}  (kto)

Chat, instruction and prompt records keep the row's other columns under
"columns" (a reference `answer` that a grpo reward compares against).

Every bad row raises DataError naming the file, the row and the field.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")

ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "tool": "tool",
    "ipython": "tool",
    "observation": "tool",  # LLaMA-Factory's ShareGPT: a tool's result
    "function": "tool",
    "function_call": "assistant",  # LLaMA-Factory's ShareGPT: a call, its value the call's JSON
}


class DataError(UserError, ValueError):
    """A problem in the user's data; the message names the place and the fix."""


@dataclass
class Row:
    values: dict[str, Any]
    where: str  # "file.jsonl line 12" / "file.csv row 4"


TOO_DEEP = "nested deeper than any dataset row needs (Python's JSON reader stops at about 1,000 levels); fix or remove it"


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a byte-order mark (Excel, Notepad) is read past
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); fix that line")
            except RecursionError:
                raise DataError(f"{path} line {number}: {TOO_DEEP}") from None
            if not isinstance(value, dict):
                raise DataError(f"{path} line {number}: expected a JSON object per line, got {type(value).__name__}")
            yield Row(value, f"{path.name} line {number}")


def _read_json(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: {TOO_DEEP}") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); fix the file there")
    if isinstance(value, dict):
        # {"data": [...]} / {"train": [...]} wrappers
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows (or JSON lines), found an object with keys {sorted(value)}")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of rows, got {type(value).__name__}")
    for number, item in enumerate(value, 1):
        if not isinstance(item, dict):
            raise DataError(f"{path} row {number}: expected an object, got {type(item).__name__}")
        yield Row(item, f"{path.name} row {number}")


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for number, item in enumerate(csv.DictReader(handle), 2):
            if None in item:
                raise DataError(f"{path} line {number}: more cells than header columns; quote cells that hold commas")
            yield Row(dict(item), f"{path.name} line {number}")


def _read_txt(path: Path) -> Iterator[Row]:
    """A text file is one document per blank-line-separated paragraph."""
    text = path.read_text(encoding="utf-8-sig")
    for number, block in enumerate(text.split("\n\n"), 1):
        if block.strip():
            yield Row({"text": block.strip("\n")}, f"{path.name} paragraph {number}")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for number, item in enumerate(pq.read_table(path).to_pylist(), 1):
        yield Row(item, f"{path.name} row {number}")


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt, ".parquet": _read_parquet}


def _locate(location: str, base: Optional[Path]) -> Path:
    """A dataset path as written, else relative to the config's folder (or dataset_dir)."""
    path = Path(location).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    return path


def _saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def data_files(location: str, base: Optional[Path] = None) -> list[Path]:
    """The files behind one dataset entry (a file or a folder of them); [] for a hub id."""
    path = _locate(location, base)
    try:
        if path.is_file():
            return [path]
        if path.is_dir():
            if _saved_dataset(path):
                return sorted(p for p in path.rglob("*") if p.is_file())
            files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.name != "template.json")
            broken = next((p for p in files if not p.is_file()), None)
            if broken is not None:
                raise DataError(f"{broken}: cannot be read (a link that leads nowhere or to itself, or not a file); "
                                "fix or remove it")
            if not files:
                raise DataError(f"{location}: the folder holds no {', '.join(SUFFIXES)} files")
            return files
    except OSError as exc:  # a symlink loop (ELOOP), a folder it may not read, ...
        raise DataError(f"{exc.filename or location}: cannot be read ({exc.strerror}); fix or remove it") from None
    if location.endswith(SUFFIXES) or location.startswith((".", "/", "~")):
        raise DataError(f"{location}: no such file or folder; check the dataset path")
    return []


def read_rows(location: str, base: Optional[Path] = None, split: str = "train", streaming: bool = False) -> Iterator[Row]:
    """The rows of one dataset entry in order; a hub dataset read as a stream when `streaming`."""
    files = data_files(location, base)
    if not files:
        yield from _read_hub(location, split, streaming)
        return
    path = _locate(location, base)
    if _saved_dataset(path):
        from datasets import load_from_disk

        loaded = load_from_disk(str(path))
        if hasattr(loaded, "keys"):  # a DatasetDict
            loaded = loaded[split]
        for number, item in enumerate(loaded, 1):
            yield Row(dict(item), f"{path.name} row {number}")
        return
    for file in files:
        yield from read_file(file)


def read_file(file: Path) -> Iterator[Row]:
    """One data file's rows, by its suffix; text that is not UTF-8 named by its line."""
    try:
        yield from READERS[file.suffix](file)
    except UnicodeDecodeError as exc:
        line = file.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{file} line {line}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
            "re-save the file as UTF-8"
        ) from None


def load_hub(name: str, split: str, streaming: bool = False) -> Any:
    """The ordinary `datasets` path for hub ids; never reached offline in tests."""
    from datasets import load_dataset

    try:
        return load_dataset(name, split=split, streaming=streaming)
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as exc:  # offline, a typo, a private dataset
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"dataset: {name} cannot be loaded from the Hugging Face Hub ({first}); check the name, that "
                        "this machine is online, or give a local file") from None


def _read_hub(name: str, split: str, streaming: bool = False) -> Iterator[Row]:
    for number, item in enumerate(load_hub(name, split, streaming), 1):
        yield Row(dict(item), f"{name} row {number}")


FORMAT_COLUMNS = {
    "text": "text",
    "instruction": "instruction + output (alpaca), or prompt + response",
    "chat": "messages (role/content), conversations (from/value) or dialog",
    "preference": "chosen + rejected, with prompt, messages or conversations",
    "prompt": "prompt, instruction, or messages without an answer",
    "unpaired": "prompt + completion + label (true: desirable), or messages + kto_tag",
}


def detect_format(columns: set[str]) -> Optional[str]:
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if "kto_tag" in columns or ({"label", "completion"} <= columns):
        return "unpaired"
    if columns & {"messages", "conversations", "dialog"}:
        return "chat"
    if "instruction" in columns and "output" in columns:
        return "instruction"
    if "prompt" in columns and columns & {"response", "completion", "output"}:
        return "instruction"
    if "text" in columns:
        return "text"
    if columns & {"prompt", "instruction"}:
        return "prompt"
    return None


def _need(row: Row, field: str) -> Any:
    value = row.values.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{row.where}: the field `{field}` is missing or empty; fill it in or remove the row")
    return value


def _messages(row: Row, field: str) -> list[dict[str, str]]:
    turns = _need(row, field)
    if not isinstance(turns, list):
        raise DataError(f"{row.where}: `{field}` must be a list of turns, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        messages.append(_turn(row, f"{field}[{index}]", turn))
    return messages


def _turn(row: Row, where: str, turn: Any) -> dict[str, Any]:
    """role and content, with an answer's reasoning and tool calls kept in the shapes chat templates take."""
    if not isinstance(turn, dict):
        raise DataError(f"{row.where}: `{where}` must be an object with role and content")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    calls = turn.get("tool_calls")
    if role is not None and str(role).lower() == "function_call":  # the value is the call itself
        calls, content = [_call_json(row, where, content)], ""
    if role is None or (content is None and not calls):
        raise DataError(f"{row.where}: `{where}` needs role/content (or ShareGPT from/value)")
    if str(role).lower() not in ROLE_NAMES:
        raise DataError(f"{row.where}: `{where}` has role {role!r}; expected user, assistant, system or tool")
    message: dict[str, Any] = {"role": ROLE_NAMES[str(role).lower()], "content": _content(row, where, content or "")}
    reasoning = next((turn[k] for k in ("reasoning_content", "reasoning", "thinking") if turn.get(k)), None)
    if reasoning is not None and message["role"] == "assistant":
        message["reasoning_content"] = _content(row, f"{where}.reasoning_content", reasoning)
    if calls and message["role"] == "assistant":
        message["tool_calls"] = _tool_calls(row, where, calls)
    for key in ("tool_call_id", "name"):
        if message["role"] == "tool" and isinstance(turn.get(key), str):
            message[key] = turn[key]
    return message


def _call_json(row: Row, where: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{row.where}: `{where}` is a function_call whose value is not JSON "
                            '({"name": ..., "arguments": {...}}); fix that turn') from None
    return value


def _tool_calls(row: Row, where: str, calls: Any) -> list[dict[str, Any]]:
    """OpenAI's [{"type": "function", "function": {"name", "arguments"}}]; bare {"name", "arguments"} calls too."""
    if isinstance(calls, dict):
        calls = [calls]
    out = []
    for index, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"{row.where}: `{where}.tool_calls[{index}]` needs a function name "
                            '({"type": "function", "function": {"name": ..., "arguments": {...}}})')
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass  # kept as written: a template writes a string argument as it is
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(row: Row) -> Optional[list[Any]]:
    """A row's `tools` (function schemas), as a list or its JSON text (LLaMA-Factory writes a string)."""
    tools = row.values.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise DataError(f"{row.where}: `tools` is not JSON; give a list of function schemas") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise DataError(f"{row.where}: `tools` must be a list of function schemas, got {type(tools).__name__}")
    return tools


def _content(row: Row, where: str, content: Any) -> str:
    """A turn's text; OpenAI's list of parts ([{"type": "text", "text": ...}]) is joined."""
    if isinstance(content, (str, int, float)):
        return str(content)
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        return "".join(str(part.get("text", "")) for part in content)
    raise DataError(f"{row.where}: `{where}` content must be text (or a list of text parts), got {type(content).__name__}; "
                    "images and other parts are not trained on")


def _preference_answer(row: Row, field: str) -> str:
    """A preference answer; an empty string is kept (the pair is dropped and counted later), a missing one is an error."""
    value = row.values.get(field)
    if isinstance(value, str) and not value.strip():
        return ""
    return _answer(row, field)


def _answer(row: Row, field: str) -> str:
    value = _need(row, field)
    if isinstance(value, dict):
        return _turn(row, field, value)["content"]
    if isinstance(value, list):  # a chat list whose last turn is the answer
        return _turn(row, f"{field}[-1]", value[-1])["content"]
    return str(value)


def _check_alternation(row: Row, messages: list[dict[str, Any]], need_answer: bool) -> None:
    """user and assistant turns alternate; tool results follow an answer that calls tools, and an answer follows them."""
    turns = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise DataError(f"{row.where}: a system turn may only come first")
    expected = "user"
    for index, message in enumerate(turns):
        role = message["role"]
        if role == "tool":
            previous = turns[index - 1] if index else None
            if previous is None or not (previous["role"] == "tool" or previous.get("tool_calls")):
                raise DataError(f"{row.where}: turn {index + 1} is a tool result with no tool call before it; "
                                "a tool turn follows an assistant turn that has tool_calls")
            expected = "assistant"
            continue
        if role != expected:
            raise DataError(f"{row.where}: turn {index + 1} is {role}, expected {expected}; turns must alternate")
        expected = "assistant" if role == "user" else "user"
        if role == "assistant" and message.get("tool_calls"):
            expected = "tool"
    if need_answer and (not turns or turns[-1]["role"] != "assistant"):
        raise DataError(f"{row.where}: the conversation does not end with an assistant turn, so nothing would be learned")


def _instruction_messages(row: Row) -> list[dict[str, str]]:
    values = row.values
    if "instruction" in values:
        prompt = str(_need(row, "instruction"))
        if values.get("input"):
            prompt = f"{prompt}\n\n{values['input']}"
    else:
        prompt = str(_need(row, "prompt"))
    messages = []
    if values.get("system"):
        messages.append({"role": "system", "content": str(values["system"])})
    for pair in values.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"{row.where}: `history` must be a list of [question, answer] pairs")
        messages += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    messages.append({"role": "user", "content": prompt})
    return messages


# The columns the formats read; the rest of a row travels with its record as "columns".
READ_COLUMNS = frozenset({
    "text", "messages", "conversations", "dialog", "instruction", "input", "output", "prompt", "response", "completion",
    "system", "history", "chosen", "rejected", "margin", "label", "kto_tag", "tools",
})


def other_columns(row: Row) -> dict[str, Any]:
    """The row's columns that no format reads, when they are plain values (strings, numbers, lists of them)."""
    plain = (str, int, float, bool, type(None))
    return {
        k: v for k, v in row.values.items()
        if k not in READ_COLUMNS and (isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v)))
    }


def normalise(row: Row, fmt: str) -> dict[str, Any]:
    """One row in the canonical shape of its format."""
    record = _normalised(row, fmt)
    if record["kind"] in ("chat", "prompt"):
        extra = other_columns(row)
        if extra:
            record["columns"] = extra
    return record


def _normalised(row: Row, fmt: str) -> dict[str, Any]:
    values = row.values
    if fmt == "text":
        text = _need(row, "text")
        if not isinstance(text, (str, int, float)):
            raise DataError(f"{row.where}: `text` must be a string, got {type(text).__name__}; put the document's text there")
        return {"kind": "text", "text": str(text)}
    if fmt == "chat":
        field = next(f for f in ("messages", "conversations", "dialog") if f in values)
        messages = _messages(row, field)
        _check_alternation(row, messages, need_answer=True)
        record = {"kind": "chat", "messages": messages}
        tools = _tools(row)
        if tools:
            record["tools"] = tools
        if not any(m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content")
                   for m in messages if m["role"] == "assistant"):
            record.update(drop="every answer is empty", where=row.where)  # counted and reported, as empty pairs are
        return record
    if fmt == "instruction":
        messages = _instruction_messages(row)
        answer_field = next((f for f in ("output", "response", "completion") if f in values), "output")
        messages.append({"role": "assistant", "content": str(_need(row, answer_field))})
        return {"kind": "chat", "messages": messages}
    if fmt == "preference":
        if "messages" in values or "conversations" in values:
            field = "messages" if "messages" in values else "conversations"
            messages = _messages(row, field)
        else:
            messages = _instruction_messages(row)
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{row.where}: the prompt of a preference row must end with a user turn")
        chosen, rejected = _preference_answer(row, "chosen"), _preference_answer(row, "rejected")
        record = {"kind": "preference", "messages": messages, "chosen": chosen, "rejected": rejected}
        # Pairs that teach nothing are dropped and counted, not errors: whole datasets carry a few.
        if not chosen.strip() or not rejected.strip():
            record.update(drop="chosen or rejected answer is empty", where=row.where)
        elif chosen.strip() == rejected.strip():
            record.update(drop="chosen equals rejected", where=row.where)
        if values.get("margin") is not None:
            try:
                record["margin"] = float(values["margin"])
            except (TypeError, ValueError):
                raise DataError(f"{row.where}: `margin` must be a number, got {values['margin']!r}") from None
        return record
    if fmt == "unpaired":
        return _unpaired(row)
    if fmt == "prompt":
        if "messages" in values or "conversations" in values:
            messages = _messages(row, "messages" if "messages" in values else "conversations")
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            messages = _instruction_messages(row)
        return {"kind": "prompt", "messages": messages}
    raise DataError(f"unknown dataset format {fmt!r}")


LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _unpaired(row: Row) -> dict[str, Any]:
    """TRL's prompt/completion/label, or a conversation whose last assistant turn is the answer (LLaMA-Factory's kto_tag)."""
    values = row.values
    field = "kto_tag" if "kto_tag" in values else "label"
    label = values.get(field)
    if isinstance(label, str):
        label = LABEL_WORDS.get(label.strip().lower(), label)
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise DataError(f"{row.where}: `{field}` must be true (a desirable answer) or false (undesirable), got {label!r}; "
                        "every kto row needs a label (or kto_tag)")
    if "messages" in values or "conversations" in values:
        messages = _messages(row, "messages" if "messages" in values else "conversations")
        _check_alternation(row, messages, need_answer=True)
        return {"kind": "unpaired", "messages": messages[:-1], "completion": messages[-1]["content"], "label": label}
    if isinstance(values.get("prompt"), list):  # TRL's conversational form: the prompt's turns
        messages = _messages(row, "prompt")
    else:  # prompt, or instruction (+ input) as alpaca rows write it
        messages = _instruction_messages(row)
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{row.where}: the prompt of a kto row must end with a user turn")
    return {"kind": "unpaired", "messages": messages, "completion": _answer(row, "completion"), "label": label}


def rename_columns(values: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Apply `dataset_columns` ({lmtune_name: user_column})."""
    if not columns:
        return values
    out = dict(values)
    for ours, theirs in columns.items():
        if theirs in out:
            out[ours] = out.pop(theirs)
    return out


def jumpstart_template(folder: Path) -> Optional[dict[str, str]]:
    path = folder / "template.json"
    if not path.exists():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})")
    if not isinstance(template, dict) or not {"prompt", "completion"} <= set(template):
        raise DataError(f"{path}: a JumpStart template needs the keys `prompt` and `completion`")
    return template


def render_jumpstart(row: Row, template: dict[str, str]) -> dict[str, Any]:
    """A JumpStart instruction row through its template.json format strings."""
    try:
        prompt = template["prompt"].format(**row.values)
        completion = template["completion"].format(**row.values)
    except KeyError as exc:
        raise DataError(f"{row.where}: template.json names the field {{{exc.args[0]}}}, which this row lacks")
    return {"kind": "completion", "prompt": prompt, "completion": completion}
