"""Prompt formats: a record becomes examples of text segments, each marked trained or not.

A format is a function from a conversation to text (lmtune's named formats
below, or the tokenizer's own Jinja chat template). Loss masks come from
rendering growing prefixes of the conversation: what the generation prompt of
turn i adds is context, what the answer adds is trained. Where a format
rewrites earlier turns (Qwen3 and DeepSeek-R1 drop earlier reasoning), the
answer that follows starts a new example, so every answer is trained in the
context the model sees when it is served. The tokenizer is always called with
`add_special_tokens=False`: BOS is what the format writes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from .records import DataError

Segment = tuple[str, bool]  # (text, trained)

DEMARCATION = "### Response:\n"
ANSWER_APART = "answers trained as examples of their own: the chat template rewrites the turns before them"
REASONING_LEFT_OUT = "kept without its reasoning: the chat template's generation prompt closes the <think> block"


@dataclass(frozen=True)
class Template:
    """One family's chat format. "{content}" is a turn's text, "{eos}"/"{bos}" the tokenizer's end/begin tokens."""

    name: str
    user: str
    assistant_prefix: str  # opens the answer; part of the prompt
    assistant_suffix: str  # closes the answer; trained
    system: str = ""  # "" puts the system text before the first user turn's text, with a blank line
    bos: bool = True
    markers: tuple[str, ...] = field(default=())  # special tokens the tokenizer must know
    start: str = ""  # written once at the very start, after BOS (GLM-4's "[gMASK]<sop>")
    default_system: str = ""  # the family's system text when the conversation has none
    system_in_user: str = ""  # Llama 2: the system text wrapped into the first user turn
    reasoning: str = ""  # how an answer's reasoning is written before its text; "" never shows reasoning
    history_reasoning: bool = True  # False: answers before the last user turn are shown without reasoning
    last_opening: str = ""  # what opens the answer after the last user turn when no reasoning is shown
    opening_in_prompt: bool = False  # last_opening belongs to the generation prompt (not trained)
    tool: str = "{content}\n"  # a tool's result, as the next turn
    tool_call: str = '{"name": "{name}", "arguments": {arguments}}'  # one call in an answer ({name}, {arguments})
    family: str = ""  # who uses it, for `lmtune explain template`


CHATML = dict(
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>\n",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    bos=False,
    markers=("<|im_start|>", "<|im_end|>"),
    tool="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n",
    tool_call='<tool_call>\n{"name": "{name}", "arguments": {arguments}}\n</tool_call>',
)
QWEN3 = dict(CHATML, reasoning="<think>\n{reasoning}\n</think>\n\n", history_reasoning=False, last_opening="<think>\n\n</think>\n\n")
DEEPSEEK3 = dict(
    user="<｜User｜>{content}",
    assistant_prefix="<｜Assistant｜>",
    assistant_suffix="{eos}",
    system="{content}",
    markers=("<｜User｜>", "<｜Assistant｜>"),
    tool="<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>",
)
_TEMPLATES = [
    Template(
        "llama3",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        markers=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        family="Llama 3, 3.1, 3.2, 3.3",
    ),
    Template("chatml", **CHATML, family="ChatML (OpenHermes, Yi, many fine-tunes)"),
    Template(
        "qwen2.5", **CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        family="Qwen 1.5, 2, 2.5 (ChatML with Qwen's default system text)",
    ),
    Template("qwen3", **QWEN3, family="Qwen3 (thinking): answers carry <think> blocks; earlier reasoning is dropped"),
    Template(
        "qwen3_nothink", **dict(QWEN3, reasoning="", opening_in_prompt=True),
        family="Qwen3 with thinking off: the prompt opens an empty <think> block",
    ),
    Template(
        "mistral", user="[INST] {content} [/INST]", assistant_prefix="", assistant_suffix="{eos}",
        family="Mistral 7B v0.1-v0.2, Mixtral",
    ),
    Template(
        "mistral_v3_tekken", user="[INST]{content}[/INST]", assistant_prefix="", assistant_suffix="{eos}",
        family="Mistral Nemo, v0.3 with the Tekken tokenizer",
    ),
    Template(
        "mistral_v7_tekken", user="[INST]{content}[/INST]", assistant_prefix="", assistant_suffix="{eos}",
        system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]", family="Mistral Small 3, Magistral",
    ),
    Template(
        "llama2", user="{bos}[INST] {content} [/INST]", assistant_prefix=" ", assistant_suffix=" {eos}", bos=False,
        system_in_user="<<SYS>>\n{content}\n<</SYS>>\n\n", family="Llama 2 chat",
    ),
    Template(
        "gemma", user="<start_of_turn>user\n{content}<end_of_turn>\n", assistant_prefix="<start_of_turn>model\n",
        assistant_suffix="<end_of_turn>\n", markers=("<start_of_turn>", "<end_of_turn>"),
        family="Gemma, Gemma 2, Gemma 3 (a system text joins the first user turn)",
    ),
    Template(
        "phi3", user="<|user|>\n{content}<|end|>\n", assistant_prefix="<|assistant|>\n", assistant_suffix="<|end|>\n",
        system="<|system|>\n{content}<|end|>\n", bos=False, markers=("<|user|>", "<|assistant|>", "<|end|>"),
        family="Phi-3, Phi-3.5",
    ),
    Template(
        "phi4", user="<|im_start|>user<|im_sep|>{content}<|im_end|>", assistant_prefix="<|im_start|>assistant<|im_sep|>",
        assistant_suffix="<|im_end|>", system="<|im_start|>system<|im_sep|>{content}<|im_end|>", bos=False,
        markers=("<|im_start|>", "<|im_sep|>", "<|im_end|>"), family="Phi-4",
    ),
    Template(
        "deepseek", user="User: {content}\n\n", assistant_prefix="Assistant:", assistant_suffix="{eos}",
        system="{content}\n\n", family="DeepSeek LLM, DeepSeek-V2",
    ),
    Template("deepseek3", **DEEPSEEK3, family="DeepSeek-V3"),
    Template(
        "deepseek-r1", **DEEPSEEK3, reasoning="<think>\n{reasoning}\n</think>\n\n", history_reasoning=False,
        family="DeepSeek-R1 and its distills: answers carry <think> blocks; earlier reasoning is dropped",
    ),
    Template(
        "glm4", user="<|user|>\n{content}", assistant_prefix="<|assistant|>\n", assistant_suffix="{eos}",
        system="<|system|>\n{content}", bos=False, start="[gMASK]<sop>", markers=("<|user|>", "<|assistant|>"),
        tool="<|observation|>\n{content}", family="GLM-4",
    ),
    Template(
        "cohere", user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        assistant_prefix="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", assistant_suffix="<|END_OF_TURN_TOKEN|>",
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
        markers=("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"),
        family="Command R, Aya",
    ),
    Template(
        "zephyr", user="<|user|>\n{content}{eos}\n", assistant_prefix="<|assistant|>\n", assistant_suffix="{eos}\n",
        system="<|system|>\n{content}{eos}\n", bos=False, family="Zephyr",
    ),
    Template(
        "vicuna", user="USER: {content} ", assistant_prefix="ASSISTANT:", assistant_suffix="{eos}", system="{content} ",
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        family="Vicuna",
    ),
    Template(
        "alpaca", user="### Instruction:\n{content}\n\n", assistant_prefix="### Response:\n", assistant_suffix="{eos}",
        system="{content}\n\n", family="Alpaca instruction format",
    ),
    Template("plain", user="{content}\n", assistant_prefix="", assistant_suffix="{eos}", family="text, a newline, the answer"),
]
# The five formats lmtune started with, and the families' own formats beside them.
TEMPLATES = {t.name: t for t in _TEMPLATES if t.name in ("llama3", "chatml", "mistral", "alpaca", "plain")}
FAMILY_TEMPLATES = {t.name: t for t in _TEMPLATES if t.name not in TEMPLATES}
ALL_TEMPLATES = {t.name: t for t in _TEMPLATES}

# Names that mean "the model's own chat template": the format is only rendered exactly by the file the model ships.
OWN_TEMPLATE = "tokenizer_default"
OWN_ONLY = {"gpt-oss": "gpt-oss's harmony format (channels, a dated system header)"}

# The names LLaMA-Factory, Axolotl and model cards write for the formats above.
TEMPLATE_NAMES = {
    **{name: name for name in ALL_TEMPLATES},
    "qwen": "chatml", "qwen2": "qwen2.5", "qwen2_5": "qwen2.5", "qwen_25": "qwen2.5", "qwen25": "qwen2.5",
    "qwen3_think": "qwen3", "qwen3_no_think": "qwen3_nothink",
    "llama-3": "llama3", "llama3.1": "llama3", "llama3_1": "llama3", "llama3.2": "llama3", "llama-2": "llama2",
    "mistral_v1": "mistral", "mistral_v2v3": "mistral", "ministral": "mistral_v3_tekken", "mistral_small": "mistral_v7_tekken",
    "gemma2": "gemma", "gemma3": "gemma", "gemma_3": "gemma",
    "phi": "phi3", "phi_3": "phi3", "phi3.5": "phi3", "phi_35": "phi3", "phi-4": "phi4", "phi_4": "phi4",
    "deepseek2": "deepseek", "deepseek_v2": "deepseek", "deepseekv3": "deepseek3", "deepseek_v3": "deepseek3",
    "deepseekr1": "deepseek-r1", "deepseek_r1": "deepseek-r1", "glm-4": "glm4", "chatglm4": "glm4",
    "aya": "cohere", "command_r": "cohere",
    "gpt": "gpt-oss", "gpt_oss": "gpt-oss", "gptoss": "gpt-oss", "harmony": "gpt-oss",
    "jinja": OWN_TEMPLATE, OWN_TEMPLATE: OWN_TEMPLATE, "gpt-oss": "gpt-oss",
    "empty": "plain", "default": "plain",
}


def canonical_template(name: Optional[str]) -> Optional[str]:
    """The format a template name means; None for the tokenizer's own; KeyError for a name lmtune does not know."""
    if name is None:
        return None
    found = TEMPLATE_NAMES[name.strip().lower()]
    return None if found == OWN_TEMPLATE else found


def _has_reasoning(message: dict[str, Any]) -> bool:
    return bool(message.get("reasoning_content")) or "</think>" in message.get("content", "")


def split_reasoning(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) of an assistant turn: `reasoning_content`, or a <think> block at the start of its text."""
    content = message.get("content", "")
    if message.get("reasoning_content"):
        return message["reasoning_content"].strip("\n"), content.lstrip("\n")
    if "</think>" in content:
        thought, _, rest = content.partition("</think>")
        return thought.split("<think>")[-1].strip("\n"), rest.lstrip("\n")
    return "", content


def without_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out["content"] = split_reasoning(message)[1]
    return out


def _arguments(call: dict[str, Any]) -> str:
    arguments = call.get("arguments", {})
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


@dataclass(frozen=True)
class NamedFormat:
    """A Template as a rendering function with the tokenizer's BOS and EOS filled in."""

    template: Template
    bos_token: str
    eos_token: str

    def fill(self, text: str, content: str = "") -> str:
        return text.replace("{eos}", self.eos_token).replace("{bos}", self.bos_token).replace("{content}", content)

    def answer(self, message: dict[str, Any], shown: bool, last: bool) -> str:
        t = self.template
        reasoning, text = split_reasoning(message)
        opening = ""
        if t.reasoning and shown and (reasoning or (last and t.last_opening)):
            opening = t.reasoning.replace("{reasoning}", reasoning)
        elif last and t.last_opening and not t.opening_in_prompt:
            opening = t.last_opening
        for index, call in enumerate(message.get("tool_calls") or []):
            call = call.get("function", call)
            written = t.tool_call.replace("{name}", str(call.get("name", ""))).replace("{arguments}", _arguments(call))
            text += ("\n" if text or index else "") + written
        return opening + text + self.fill(t.assistant_suffix)

    def __call__(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Optional[list] = None) -> str:
        t = self.template
        out = (self.bos_token if t.bos else "") + t.start
        system, turns = t.default_system, messages
        if messages and messages[0]["role"] == "system":
            system, turns = messages[0]["content"], messages[1:]
        if tools:
            system = (system + "\n\n" if system else "") + "# Tools\n\n" + "\n".join(json.dumps(x, ensure_ascii=False) for x in tools)
        if system and t.system:
            out += self.fill(t.system, system)
            system = ""
        last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
        opening_prompt = t.last_opening if t.opening_in_prompt else ""
        for index, message in enumerate(turns):
            role = message["role"]
            if role == "user":
                content = message["content"]
                if system:
                    wrapped = self.fill(t.system_in_user, system) if t.system_in_user else system + "\n\n"
                    content, system = wrapped + content, ""
                out += self.fill(t.user, content)
            elif role == "tool":
                out += self.fill(t.tool, message["content"])
            else:
                after_last = index > last_user
                out += self.fill(t.assistant_prefix) + (opening_prompt if after_last else "")
                out += self.answer(message, t.history_reasoning or after_last, after_last)
        if add_generation_prompt:
            out += self.fill(t.assistant_prefix) + opening_prompt
        return out


@dataclass
class Renderer:
    """Renders records for one tokenizer with one named format (or the tokenizer's own chat template)."""

    template: Optional[Template]
    bos_token: Optional[str]
    eos_token: str
    chat_template_owner: Any = None  # the tokenizer, when its own chat template is used
    train_on_inputs: bool = False
    demarcation: bool = False
    train_on_reasoning: bool = True
    enable_thinking: Optional[bool] = None  # passed to the model's own template; False turns a named one's thinking off
    notes: Counter = field(default_factory=Counter)  # what rendering changed, counted for the data summary

    def __post_init__(self) -> None:
        template = self.template
        if template is not None and self.enable_thinking is False and template.reasoning and template.last_opening:
            self.template = replace(template, reasoning="", opening_in_prompt=True)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: Optional[list] = None) -> str:
        if not messages and not add_generation_prompt:
            return ""
        if self.template is not None:
            return NamedFormat(self.template, self.bos_token or "", self.eos_token)(messages, add_generation_prompt, tools)
        extra = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        if tools:
            extra["tools"] = tools
        return self.chat_template_owner.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )

    def answer_end(self) -> str:
        """What closes every answer of a named format (trained with it)."""
        return NamedFormat(self.template, "", self.eos_token).fill(self.template.assistant_suffix) if self.template else self.eos_token

    def conversation(self, messages: list[dict[str, Any]], tools: Optional[list] = None) -> list[list[Segment]]:
        """The examples one conversation trains: segments of growing prefixes, a new example where the format
        rewrites what came before."""
        examples: list[list[Segment]] = []
        segments: list[Segment] = []
        done, answered = "", -1  # the text so far, and the index of the answer it ends with
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, after, message_segments = self._turn(messages, index, tools)
            if not before.startswith(done):
                done = self._trim_conversation_end(segments, done, before)
            if not before.startswith(done):  # earlier turns are shown differently now: a new example
                self.notes[ANSWER_APART] += 1
                segments.append((self._stop_after(segments, messages[: answered + 1], tools), True))
                examples.append(segments)
                segments, done = [], ""
            prompt = before[len(done):]
            stop = self._stop_opening(segments, prompt)
            if stop:  # the template ends an answer with the next turn's opening token (GLM): it is trained with it
                segments.append((stop, True))
            segments += [(prompt[len(stop):], self.train_on_inputs)] + message_segments
            done, answered = after, index
        if answered == len(messages) - 1:
            segments.append((self._stop_after(segments, messages, tools), True))
        elif messages:  # turns after the last answer: context
            tail = self.render(messages, False, tools)
            if tail.startswith(done) and len(tail) > len(done):
                segments.append((tail[len(done):], self.train_on_inputs))
        examples.append(segments)
        return [[s for s in example if s[0]] for example in examples if any(s[0] for s in example)]

    def _markers(self) -> list[str]:
        """The tokenizer's added tokens (end-of-turn markers among them), longest first."""
        owner = self.chat_template_owner
        added = owner.get_added_vocab() if owner is not None and hasattr(owner, "get_added_vocab") else {}
        return sorted(added, key=len, reverse=True)

    def _ends_with_marker(self, text: str) -> bool:
        text = text.rstrip()
        return bool(text) and any(text.endswith(marker) for marker in self._markers())

    def _stop_opening(self, segments: list[Segment], prompt: str) -> str:
        """When the answer before `prompt` ends in no marker, the marker that opens the next turn (generation stops
        there: GLM-4 ends an answer with the next `<|user|>`)."""
        if self.template is not None or not segments or not segments[-1][1] or self._ends_with_marker(segments[-1][0]):
            return ""
        return next((m for m in self._markers() if prompt.startswith(m)), "")

    def _stop_after(self, segments: list[Segment], messages: list[dict[str, Any]], tools: Optional[list]) -> str:
        """For the last answer of `messages` (the last of `segments`), when it ends in no marker: the marker a next
        user turn opens with."""
        if self.template is not None or not messages or not segments or self._ends_with_marker(segments[-1][0]):
            return ""
        try:
            more = self.render(messages + [{"role": "user", "content": "\x00"}], False, tools)
        except Exception:  # a template that refuses the extra turn: nothing to add
            return ""
        opening = more[: more.rfind("\x00")].rstrip()  # what a user turn opens with, just before its text
        return next((m for m in self._markers() if opening.endswith(m)), "")

    def _trim_conversation_end(self, segments: list[Segment], done: str, before: str) -> str:
        """Phi-3 writes EOS after a conversation's last answer only: when the next prompt differs from what came
        before just there, the earlier answer is trained up to its end-of-turn marker and the example goes on."""
        common = 0
        while common < min(len(done), len(before)) and done[common] == before[common]:
            common += 1
        cut = len(done) - common
        if not segments or not segments[-1][1] or cut >= len(segments[-1][0]):
            return done
        kept = segments[-1][0][: len(segments[-1][0]) - cut]
        if not self._ends_with_marker(kept) or done[common:].strip() not in self._markers():
            return done
        segments[-1] = (kept, True)
        return done[:common]

    def _turn(self, messages: list[dict[str, Any]], index: int, tools: Optional[list]) -> tuple[str, str, list[Segment]]:
        """(the prompt the model sees before answer `index`, the text with the answer, the answer's segments)."""
        message = messages[index]
        before = self.render(messages[:index], True, tools)
        after = self.render(messages[: index + 1], False, tools)
        if not after.startswith(before) and not _has_reasoning(message) and self.enable_thinking is None:
            # A template that opens a <think> block when thinking is on shows a plain answer in its thinking-off prompt.
            quiet = Renderer(self.template, self.bos_token, self.eos_token, self.chat_template_owner, enable_thinking=False)
            if after.startswith(quiet.render(messages[:index], True, tools)):
                before = quiet.render(messages[:index], True, tools)
        if not after.startswith(before) and _has_reasoning(message):
            plain = self.render(messages[:index] + [without_reasoning(message)], False, tools)
            if plain.startswith(before):  # a thinking-off template: the model is served without reasoning
                self.notes[REASONING_LEFT_OUT] += 1
                message, after = without_reasoning(message), plain
        if not after.startswith(before):
            raise DataError(
                "the chat template does not show an answer after its own generation prompt (it writes "
                f"{_differs(before, after)}), so no answer can be trained as the model is served; "
                "set `template:` to the family's name (see `lmtune explain template`)"
            )
        answer = after[len(before):]
        return before, after, self._answer_segments(answer, message)

    def _answer_segments(self, answer: str, message: dict[str, Any]) -> list[Segment]:
        """An answer's text, trained; with train_on_reasoning false, its reasoning text is not."""
        reasoning = split_reasoning(message)[0] if not self.train_on_reasoning else ""
        at = answer.find(reasoning) if reasoning else -1
        if at < 0:
            return [(answer, True)]
        end = at + len(reasoning)
        return [(answer[:at], True), (answer[at:end], self.train_on_inputs), (answer[end:], True)]

    def chat(self, messages: list[dict[str, Any]], add_answer_prefix: bool = False, tools: Optional[list] = None) -> list[Segment]:
        """Segments of one conversation as one example (the last one, when the format splits it); with
        add_answer_prefix, it ends ready for the model's answer."""
        if add_answer_prefix:
            return [(self.render(messages, True, tools), self.train_on_inputs)]
        return self.conversation(messages, tools)[-1]

    def completion(self, prompt: str, completion: str) -> list[Segment]:
        """A JumpStart template.json row: prompt and completion text, with optional demarcation."""
        if self.demarcation:
            prompt = prompt if prompt.endswith("\n") else prompt + "\n\n"
            prompt += DEMARCATION
        start = self.bos_token or ""
        return [(start + prompt, self.train_on_inputs), (completion + self.eos_token, True)]

    def examples(self, record: dict[str, Any]) -> list[list[Segment]]:
        kind = record["kind"]
        if kind == "chat":
            return self.conversation(self._demarcate(record["messages"]), record.get("tools"))
        if kind == "completion":
            return [self.completion(record["prompt"], record["completion"])]
        if kind == "prompt":
            return [self.chat(record["messages"], add_answer_prefix=True, tools=record.get("tools"))]
        raise DataError(f"records of kind {kind} are not rendered as one sequence")

    def record(self, record: dict[str, Any]) -> list[Segment]:
        """One record's segments, when it is one example (as every named format but Qwen3/DeepSeek-R1 gives)."""
        return [segment for example in self.examples(record) for segment in example]

    def prompt_and_answer(self, messages: list[dict[str, Any]], answer: str) -> tuple[str, str]:
        """A preference or kto prompt and one answer to it, each as the format writes them."""
        prompt = self.render(messages, True)
        if self.template is not None:
            return prompt, answer + self.answer_end()
        full = self.render(messages + [{"role": "assistant", "content": answer}], False)
        if not full.startswith(prompt):
            raise DataError("the chat template does not show an answer after its own generation prompt; "
                            "set `template:` to the family's name (see `lmtune explain template`)")
        return prompt, full[len(prompt):]

    def _demarcate(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """With add_input_output_demarcation_key, the last prompt ends with the response marker."""
        if not self.demarcation or (self.template is not None and self.template.name == "alpaca"):
            return messages
        out = [dict(m) for m in messages]
        for message in reversed(out):
            if message["role"] == "user":
                message["content"] = message["content"].rstrip("\n") + "\n\n" + DEMARCATION.rstrip("\n")
                break
        return out


def _differs(before: str, after: str) -> str:
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    return f"{before[common:common + 24]!r} to prompt, then {after[common:common + 24]!r} with the answer"


def pick_renderer(
    tokenizer: Any, name: Optional[str], train_on_inputs: bool, demarcation: bool,
    train_on_reasoning: bool = True, enable_thinking: Optional[bool] = None, note: Callable[[str], None] = lambda _: None,
) -> Renderer:
    """The template the config names, else the tokenizer's own chat template, else `plain`."""
    eos = tokenizer.eos_token or ""
    own = getattr(tokenizer, "chat_template", None)
    options = dict(train_on_reasoning=train_on_reasoning, enable_thinking=enable_thinking)
    chosen = canonical_template(name) if name is not None else None
    if chosen in OWN_ONLY:
        if not own:
            raise DataError(f"template {name}: {OWN_ONLY[chosen]} is rendered only by the model's own chat template, "
                            "and this tokenizer has none; use the model's own tokenizer or another template")
        note(f"template {name}: the model's own chat template renders it")
        chosen = None
    if chosen is None and own:
        return Renderer(None, tokenizer.bos_token, eos, tokenizer, train_on_inputs, demarcation, **options)
    template = ALL_TEMPLATES[chosen or "plain"]
    vocab = tokenizer.get_vocab()
    missing = [m for m in template.markers if m not in vocab]
    if missing:
        raise DataError(
            f"template {template.name} writes {', '.join(missing)}, which this tokenizer does not have as tokens; "
            "use a template the tokenizer was trained with (or leave `template` unset for its own)"
        )
    return Renderer(template, tokenizer.bos_token, eos, None, train_on_inputs, demarcation, **options)
