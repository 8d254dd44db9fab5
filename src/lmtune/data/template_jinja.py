"""The chat template a run trained with, as the Jinja file its saved tokenizer carries.

Whoever serves `final/` with plain transformers (or vLLM, TGI) calls
`apply_chat_template`; these templates render exactly the text lmtune trained
on, so the ids match token for token. Each is generated from the same
`Template` fields that `NamedFormat` renders from, and a test holds the two equal.
"""

from __future__ import annotations

import json
from typing import Optional

from .templates import ALL_TEMPLATES, DEMARCATION, Template


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string is a Jinja string literal (\n, \" and \uXXXX escapes included)


def _fill(fmt: str, content: str = "''") -> str:
    """A Jinja expression for a format string: its {content}, {eos} and {bos} become expressions."""
    parts: list[str] = []
    rest = fmt
    while rest:
        cuts = [(rest.find(key), key) for key in ("{content}", "{eos}", "{bos}") if key in rest]
        if not cuts:
            parts.append(_literal(rest))
            break
        at, key = min(cuts)
        if at:
            parts.append(_literal(rest[:at]))
        parts.append({"{content}": f"({content})", "{eos}": "(eos_token or '')", "{bos}": "(bos_token or '')"}[key])
        rest = rest[at + len(key):]
    return " ~ ".join(parts) or "''"


def _answer(t: Template) -> str:
    """The assistant branch: reasoning and opening as NamedFormat.answer writes them, the text, tool calls, the end."""
    out = [
        "{%- set after_last = loop.index0 > ns.last_user -%}",
        "{{- " + _fill(t.assistant_prefix) + " -}}",
    ]
    if t.opening_in_prompt and t.last_opening:
        out.append("{%- if after_last -%}{{- " + _literal(t.last_opening) + " -}}{%- endif -%}")
    out += [
        "{%- set content = message.content or '' -%}{%- set reasoning = '' -%}",
        "{%- if message.reasoning_content -%}{%- set reasoning = message.reasoning_content.strip('\\n') -%}"
        "{%- set content = content.lstrip('\\n') -%}",
        "{%- elif '</think>' in content -%}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
        "{%- set content = content.split('</think>', 1)[1].lstrip('\\n') -%}{%- endif -%}",
    ]
    shown = "true" if t.history_reasoning else "after_last"
    branches = []
    if t.reasoning:
        test = "reasoning" + (" or after_last" if t.last_opening else "")
        head, _, tail = t.reasoning.partition("{reasoning}")
        branches.append((f"{shown} and ({test})", _literal(head) + " ~ reasoning ~ " + _literal(tail)))
    if t.last_opening and not t.opening_in_prompt:
        branches.append(("after_last", _literal(t.last_opening)))
    for index, (test, text) in enumerate(branches):
        out.append(("{%- if " if index == 0 else "{%- elif ") + test + " -%}{{- " + text + " -}}")
    if branches:
        out.append("{%- endif -%}")
    head, _, rest = t.tool_call.partition("{name}")
    middle, _, tail = rest.partition("{arguments}")
    out += [
        "{{- content -}}",
        "{%- for call in message.tool_calls or [] -%}{%- set call = call.function if call.function is defined else call -%}",
        "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}",
        "{{- " + _literal(head) + " ~ call.name ~ " + _literal(middle) + " -}}",
        "{%- if call.arguments is string -%}{{- call.arguments -}}{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}",
        "{{- " + _literal(tail) + " -}}",
        "{%- endfor -%}",
        "{{- " + _fill(t.assistant_suffix) + " -}}",
    ]
    return "".join(out)


def named_jinja(t: Template) -> str:
    """A named format as a chat template (system, user, tool and assistant turns, tools, generation prompt)."""
    wrap = _fill(t.system_in_user, "ns.system") if t.system_in_user else "ns.system ~ '\\n\\n'"
    opening_prompt = f" ~ {_literal(t.last_opening)}" if t.opening_in_prompt and t.last_opening else ""
    parts = [
        f"{{%- set ns = namespace(system={_literal(t.default_system)}, last_user=-1) -%}}",
        "{%- set turns = messages -%}",
        "{%- if messages and messages[0].role == 'system' -%}{%- set ns.system = messages[0].content -%}"
        "{%- set turns = messages[1:] -%}{%- endif -%}",
        "{%- if tools -%}{%- set ns.system = (ns.system ~ '\\n\\n' if ns.system else '') ~ '# Tools\\n\\n' -%}"
        "{%- for tool in tools -%}{%- set ns.system = ns.system ~ (tool | tojson) ~ ('' if loop.last else '\\n') -%}"
        "{%- endfor -%}{%- endif -%}",
        ("{{- bos_token or '' -}}" if t.bos else "") + (f"{{{{- {_literal(t.start)} -}}}}" if t.start else ""),
    ]
    if t.system:
        parts.append("{%- if ns.system -%}{{- " + _fill(t.system, "ns.system") + " -}}{%- set ns.system = '' -%}{%- endif -%}")
    parts += [
        "{%- for message in turns -%}{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
        "{%- endif -%}{%- endfor -%}",
        "{%- for message in turns -%}",
        "{%- if message.role == 'user' -%}{%- set content = message.content -%}",
        "{%- if ns.system -%}{%- set content = " + wrap + " ~ content -%}{%- set ns.system = '' -%}{%- endif -%}",
        "{{- " + _fill(t.user, "content") + " -}}",
        "{%- elif message.role == 'tool' -%}{{- " + _fill(t.tool, "message.content") + " -}}",
        "{%- elif message.role == 'assistant' -%}" + _answer(t),
        "{%- endif -%}{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _fill(t.assistant_prefix) + opening_prompt + " -}}{%- endif -%}",
    ]
    return "".join(parts)


def completion_jinja(demarcation: bool) -> str:
    """JumpStart template.json rows: BOS, the prompt text as the user turn, the completion and EOS."""
    prompt = "message.content"
    if demarcation:
        prompt = f"(message.content if message.content.endswith('\\n') else message.content ~ '\\n\\n') ~ {_literal(DEMARCATION)}"
    return (
        "{{- bos_token or '' -}}{%- for message in messages -%}"
        "{%- if message.role == 'user' -%}{{- " + prompt + " -}}"
        "{%- elif message.role == 'assistant' -%}{{- message.content ~ (eos_token or '') -}}{%- endif -%}{%- endfor -%}"
    )


def trained_chat_template(template: Optional[str], jumpstart: bool, demarcation: bool) -> Optional[str]:
    """The Jinja of the format a run trained with; None when it trained with the tokenizer's own template."""
    from .templates import OWN_ONLY, canonical_template

    if jumpstart:
        return completion_jinja(demarcation)
    name = canonical_template(template)
    if name is None or name in OWN_ONLY:
        return None
    return named_jinja(ALL_TEMPLATES[name])
