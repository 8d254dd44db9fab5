"""Prompt formats: a record becomes text segments, each marked trained or not.

Loss masks come from these segments (the rendered prefix lengths), never from
searching the output for marker strings. BOS is written here, once, and the
tokenizer is always called with `add_special_tokens=False`, so a template that
writes BOS and a tokenizer that adds one cannot give two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .records import DataError

Segment = tuple[str, bool]  # (text, trained)

DEMARCATION = "### Response:\n"


@dataclass(frozen=True)
class Template:
    name: str
    user: str  # "{content}" is the user's text
    assistant_prefix: str  # opens the answer; part of the prompt
    assistant_suffix: str  # closes the answer; trained ("{eos}" is the tokenizer's end token)
    system: str = ""  # "" means the system text is put before the first user turn
    bos: bool = True
    markers: tuple[str, ...] = field(default=())  # special tokens the tokenizer must know


TEMPLATES = {
    "llama3": Template(
        "llama3",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": Template(
        "chatml",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        bos=False,
        markers=("<|im_start|>", "<|im_end|>"),
    ),
    "mistral": Template(
        "mistral",
        user="[INST] {content} [/INST]",
        assistant_prefix="",
        assistant_suffix="{eos}",
    ),
    "alpaca": Template(
        "alpaca",
        user="### Instruction:\n{content}\n\n",
        assistant_prefix="### Response:\n",
        assistant_suffix="{eos}",
        system="{content}\n\n",
    ),
    "plain": Template("plain", user="{content}\n", assistant_prefix="", assistant_suffix="{eos}"),
}


@dataclass
class Renderer:
    """Renders records for one tokenizer with one template (or the tokenizer's own)."""

    template: Optional[Template]
    bos_token: Optional[str]
    eos_token: str
    chat_template_owner: Any = None  # the tokenizer, when its own chat template is used
    train_on_inputs: bool = False
    demarcation: bool = False

    def _fill(self, text: str, content: str = "") -> str:
        return text.replace("{eos}", self.eos_token).replace("{content}", content)

    def answer_end(self) -> str:
        """What closes every answer (trained with it)."""
        return self._fill(self.template.assistant_suffix) if self.template is not None else self.eos_token

    def _start(self) -> str:
        if self.template is not None and self.template.bos and self.bos_token:
            return self.bos_token
        return ""

    def chat(self, messages: list[dict[str, str]], add_answer_prefix: bool = False) -> list[Segment]:
        """Segments of a conversation; with add_answer_prefix, ends ready for the model's answer."""
        if self.template is None:
            return self._own_template(messages, add_answer_prefix)
        t = self.template
        segments: list[Segment] = []
        prompt = self._start()
        system = ""
        turns = messages
        if messages and messages[0]["role"] == "system":
            system, turns = messages[0]["content"], messages[1:]
            if t.system:
                prompt += self._fill(t.system, system)
                system = ""
        for message in turns:
            if message["role"] == "user":
                content = f"{system}\n\n{message['content']}" if system else message["content"]
                system = ""
                prompt += self._fill(t.user, content) + self._fill(t.assistant_prefix)
            else:
                segments.append((prompt, self.train_on_inputs))
                segments.append((message["content"] + self.answer_end(), True))
                prompt = ""
        if add_answer_prefix or prompt:
            segments.append((prompt, self.train_on_inputs))
        return [s for s in segments if s[0]]

    def _own_template(self, messages: list[dict[str, str]], add_answer_prefix: bool) -> list[Segment]:
        """The tokenizer's chat template, split by rendering each prefix of the conversation."""
        owner = self.chat_template_owner

        def render(upto: int, generation_prompt: bool) -> str:
            if upto == 0:
                return ""
            return owner.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

        segments: list[Segment] = []
        done = ""
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(index, True)
            after = render(index + 1, False)
            if not before.startswith(done) or not after.startswith(before):
                raise DataError(
                    "the tokenizer's chat template does not render conversations as growing prefixes; "
                    "set `template:` to one of llama3, chatml, mistral, alpaca, plain"
                )
            segments += [(before[len(done) :], self.train_on_inputs), (after[len(before) :], True)]
            done = after
        tail = render(len(messages), add_answer_prefix)
        if len(tail) > len(done):
            segments.append((tail[len(done) :], self.train_on_inputs))
        return [s for s in segments if s[0]]

    def completion(self, prompt: str, completion: str) -> list[Segment]:
        """A JumpStart template.json row: prompt and completion text, with optional demarcation."""
        if self.demarcation:
            prompt = prompt if prompt.endswith("\n") else prompt + "\n\n"
            prompt += DEMARCATION
        start = self.bos_token or ""
        return [(start + prompt, self.train_on_inputs), (completion + self.eos_token, True)]

    def record(self, record: dict[str, Any]) -> list[Segment]:
        kind = record["kind"]
        if kind == "chat":
            return self.chat(self._demarcate(record["messages"]))
        if kind == "completion":
            return self.completion(record["prompt"], record["completion"])
        if kind == "prompt":
            return self.chat(record["messages"], add_answer_prefix=True)
        raise DataError(f"records of kind {kind} are not rendered as one sequence")

    def _demarcate(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """With add_input_output_demarcation_key, the last prompt ends with the response marker."""
        if not self.demarcation or (self.template is not None and self.template.name == "alpaca"):
            return messages
        out = [dict(m) for m in messages]
        for message in reversed(out):
            if message["role"] == "user":
                message["content"] = message["content"].rstrip("\n") + "\n\n" + DEMARCATION.rstrip("\n")
                break
        return out


def pick_renderer(tokenizer: Any, name: Optional[str], train_on_inputs: bool, demarcation: bool) -> Renderer:
    """The template the config names, else the tokenizer's own chat template, else `plain`."""
    eos = tokenizer.eos_token or ""
    if name is None and getattr(tokenizer, "chat_template", None):
        return Renderer(None, tokenizer.bos_token, eos, tokenizer, train_on_inputs, demarcation)
    template = TEMPLATES[name or "plain"]
    vocab = tokenizer.get_vocab()
    missing = [m for m in template.markers if m not in vocab]
    if missing:
        raise DataError(
            f"template {template.name} writes {', '.join(missing)}, which this tokenizer does not have as tokens; "
            "use a template the tokenizer was trained with (or leave `template` unset for its own)"
        )
    return Renderer(template, tokenizer.bos_token, eos, None, train_on_inputs, demarcation)
