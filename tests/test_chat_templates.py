"""Every family's own chat template, exact: the ids lmtune trains on are `apply_chat_template`'s, and the trained
tokens are the answers with their end tokens. The corpus is the original templates the trl wheel ships."""

import re
from pathlib import Path

import pytest

from lmtune.data.records import DataError, Row, normalise
from lmtune.data.template_jinja import named_jinja
from lmtune.data.templates import (ALL_TEMPLATES, REASONING_LEFT_OUT, NamedFormat, Renderer, pick_renderer,
                                   without_reasoning)
from lmtune.data.tokenize import IGNORE, encode_examples, tokenize_records

trl = pytest.importorskip("trl")
CORPUS = Path(trl.__file__).parent / "chat_templates"
ORIGINALS = sorted(p for p in CORPUS.glob("*.jinja") if not p.stem.endswith("_training"))

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a colour Q1."},
    {"role": "assistant", "content": "Blue A1."},
    {"role": "user", "content": "Another one Q2."},
    {"role": "assistant", "content": "Green A2."},
]
REASONING = [
    {"role": "user", "content": "What is two and two Q1?"},
    {"role": "assistant", "content": "Four A1.", "reasoning_content": "Adding them R1."},
    {"role": "user", "content": "And three and three Q2?"},
    {"role": "assistant", "content": "Six A2.", "reasoning_content": "Adding again R2."},
]
MARKER = re.compile(r"<[^<>\s]{1,40}>|\[[A-Z_/]{3,20}\]")


def family_tokenizer(tiny_dir, template: str, conversations):
    """The tiny tokenizer carrying a family's template, its markers added as tokens (as the family's own has them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = template
    text = "".join(tokenizer.apply_chat_template(c, tokenize=False) for c in conversations)
    markers = sorted(set(MARKER.findall(text)) - set(tokenizer.get_vocab()))
    tokenizer.add_special_tokens({"additional_special_tokens": markers}, replace_extra_special_tokens=False)
    return tokenizer


def served_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def check_exact(tokenizer, messages):
    """lmtune's examples for `messages`: each one's ids are the template's for a prefix of the conversation ending
    in an answer, the last is the whole conversation, and only the answers (with their end) are trained."""
    renderer = pick_renderer(tokenizer, None, False, False)
    examples = renderer.conversation(messages)
    if renderer.notes[REASONING_LEFT_OUT]:  # a thinking-off template: the model is served these answers without reasoning
        messages = [without_reasoning(m) if m["role"] == "assistant" else m for m in messages]
    answers = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    encoded = encode_examples(tokenizer, examples)
    ends = [0]
    added = set(tokenizer.get_added_vocab().values())
    for ids, labels in encoded:
        # The template's ids for a prefix ending in an answer; where its answers end in no marker (GLM), the next
        # turn's opening marker follows, trained: generation stops there.
        end = next(k for k in answers if served_ids(tokenizer, messages[:k]) in (ids, ids[:-1] if ids[-1] in added else None))
        trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE])
        untrained = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE])
        shown = tokenizer.decode(ids)
        for index, message in enumerate(messages[:end]):
            word = message["content"].split()[-1]
            if message["role"] == "assistant" and index >= ends[-1] and word in shown:  # this example's answers
                assert word in trained and word not in untrained
            else:  # prompts, and answers an earlier example trained (context here)
                assert word not in trained
        ends.append(end)
        last_answer = [t for t, l in zip(ids, labels) if l != IGNORE]
        assert tokenizer.convert_ids_to_tokens(last_answer[-1]).strip() in tokenizer.all_special_tokens + ["Ċ"] or \
            tokenizer.decode(last_answer[-1:]).strip() in tokenizer.all_special_tokens
    assert ends[-1] == len(messages)
    return encoded


@pytest.mark.parametrize("path", ORIGINALS, ids=[p.stem for p in ORIGINALS])
def test_every_original_template_is_rendered_exactly_or_refused_in_one_line(path, tiny_dir):
    template = path.read_text()
    tokenizer = family_tokenizer(tiny_dir, template, [])
    try:
        tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    except Exception as exc:  # content parts only (llava-next): not a text-only template
        pytest.skip(f"{path.stem} takes content parts, not text: {exc}")
    conversation = CONVERSATION
    try:
        tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # Gemma 1 and 2 take no system turn: without it
        conversation = CONVERSATION[1:]
    tokenizer = family_tokenizer(tiny_dir, template, [conversation, REASONING])
    for messages in (conversation, REASONING):
        try:
            check_exact(tokenizer, messages)
        except DataError as exc:
            assert path.stem in REFUSED, f"{path.stem} refused: {exc}"
            assert "\n" not in str(exc) and "template" in str(exc)
            return
    assert path.stem not in REFUSED


# DeepSeek's templates drop every answer's reasoning and open a <think> block that no rendered answer closes, so
# no answer can be trained in the context the model is served with (`template: deepseek-r1` trains the format).
REFUSED = {"deepseek_r1_distill", "deepseekv3"}


def test_at_most_two_originals_are_refused():
    assert len(REFUSED) <= 2 and all((CORPUS / f"{name}.jinja").exists() for name in REFUSED)


def test_templates_that_drop_earlier_reasoning_train_each_answer_in_its_served_context(tiny_dir):
    tokenizer = family_tokenizer(tiny_dir, (CORPUS / "qwen3.jinja").read_text(), [REASONING])
    examples = pick_renderer(tokenizer, None, False, False).conversation(REASONING)
    assert len(examples) == 2  # the second answer's context no longer shows the first one's reasoning
    second_prompt = "".join(text for text, trained in examples[1] if not trained)
    assert "R1" not in second_prompt and "A1" in second_prompt
    assert "".join(text for text, trained in examples[1] if trained) == "<think>\nAdding again R2.\n</think>\n\nSix A2.<|im_end|>\n"


def test_train_on_reasoning_false_masks_the_reasoning_only(tiny_dir):
    tokenizer = family_tokenizer(tiny_dir, (CORPUS / "qwen3.jinja").read_text(), [REASONING])
    renderer = pick_renderer(tokenizer, None, False, False, train_on_reasoning=False)
    last = renderer.conversation(REASONING)[-1]
    trained = "".join(text for text, on in last if on)
    assert "R2" not in trained and "Six A2." in trained and "</think>" in trained


def test_thinking_off_renders_the_answer_after_the_empty_think_block(tiny_dir):
    tokenizer = family_tokenizer(tiny_dir, (CORPUS / "qwen3.jinja").read_text(), [CONVERSATION])
    renderer = pick_renderer(tokenizer, None, False, False, enable_thinking=False)
    last = renderer.conversation(CONVERSATION)[-1]
    assert last[-2][0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and not last[-2][1]
    assert last[-1] == ("Green A2.<|im_end|>\n", True)


def test_a_row_the_template_refuses_is_dropped_and_counted_with_its_message(tiny_dir):
    tokenizer = family_tokenizer(tiny_dir, (CORPUS / "gemma.jinja").read_text(), [CONVERSATION[1:]])
    renderer = pick_renderer(tokenizer, None, False, False)
    good = normalise(Row({"messages": CONVERSATION[1:]}, "a.jsonl line 1"), "chat")
    bad = normalise(Row({"messages": CONVERSATION}, "a.jsonl line 2"), "chat")
    bad["where"] = "a.jsonl line 2"
    examples, outcomes = tokenize_records([good, bad], renderer, tokenizer, 512, "keep_response")
    assert len(examples) == 1
    [(reason, count)] = [(k, n) for k, n in outcomes.items() if k.startswith("dropped")]
    assert count == 1 and "System role not supported" in reason and "a.jsonl line 2" in reason


TOOL_ROWS = {
    "openai": {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "1"},
            {"role": "assistant", "content": "It is sunny."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    },
    "sharegpt": {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ],
        "tools": '[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]',
    },
}


@pytest.mark.parametrize("shape", sorted(TOOL_ROWS))
def test_tool_calls_and_results_in_openai_and_sharegpt_shapes_train_the_calls(shape, tiny_dir):
    record = normalise(Row(TOOL_ROWS[shape], "r"), "chat")
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert record["messages"][1]["tool_calls"] == [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
    tokenizer = family_tokenizer(tiny_dir, (CORPUS / "qwen2_5.jinja").read_text(), [record["messages"]])
    renderer = pick_renderer(tokenizer, None, False, False)
    [segments] = renderer.examples(record)
    trained = "".join(text for text, on in segments if on)
    untrained = "".join(text for text, on in segments if not on)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>' in trained
    assert "It is sunny." in trained and "sunny\n</tool_response>" in untrained and '"parameters"' in untrained
    full = tokenizer.apply_chat_template(record["messages"], tools=record["tools"], tokenize=False)
    assert "".join(text for text, _ in segments) == full


CONVERSATIONS = [
    CONVERSATION,
    REASONING,
    TOOL_ROWS["openai"]["messages"][:1] + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {"c": 1}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "<think>\nso\n</think>\n\nIt is sunny."},
    ],
    [{"role": "user", "content": "Only a question."}],
]


@pytest.mark.parametrize("name", sorted(ALL_TEMPLATES))
def test_each_named_format_saves_as_a_chat_template_that_renders_the_same_text(name, fresh_tokenizer):
    template = ALL_TEMPLATES[name]
    rendered = NamedFormat(template, fresh_tokenizer.bos_token, fresh_tokenizer.eos_token)
    fresh_tokenizer.chat_template = named_jinja(template)
    tools = TOOL_ROWS["openai"]["tools"]
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            for given in (None, tools):
                ours = rendered(messages, generation_prompt, given)
                assert fresh_tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation_prompt, tools=given) == ours


def test_family_formats_are_the_ones_the_families_ship(tiny_dir):
    """lmtune's named format and the family's own template give the same text for an ordinary conversation."""
    pairs = {"qwen2.5": "qwen2_5", "qwen3": "qwen3", "llama3": "llama3", "phi3": "phi3", "gemma": "gemma3", "cohere": "cohere"}
    for ours, theirs in pairs.items():
        tokenizer = family_tokenizer(tiny_dir, (CORPUS / f"{theirs}.jinja").read_text(), [CONVERSATION])
        own = Renderer(None, tokenizer.bos_token, tokenizer.eos_token, tokenizer)
        named = Renderer(ALL_TEMPLATES[ours], tokenizer.bos_token, tokenizer.eos_token)
        messages = CONVERSATION[1:] if ours == "llama3" else CONVERSATION  # Llama 3.0 shows a system turn the same way
        for prefix in (messages[:2], messages[:4]):  # the prompts answers are generated from
            assert named.render(prefix, True) == own.render(prefix, True), ours


def _trained_and_served(tmp_path, rows, settings, files=None):
    """Train one step; return (the ids training used for the first row, what the saved tokenizer gives for it)."""
    import json

    from transformers import AutoTokenizer

    from lmtune.config import load_config
    from lmtune.data.pipeline import prepare
    from lmtune.engine.loop import train

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    values = {"base_model": "builtin:tiny", "dataset": str(folder), "micro_batch_size": 2, "max_steps": 1,
              "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "plot_loss": False,
              **settings}
    path = tmp_path / "run.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    config = load_config(path)
    result = train(config, tmp_path, quiet=True)
    saved = AutoTokenizer.from_pretrained(result.final_dir)
    trained = prepare(config, saved, 2048, tmp_path).train
    return trained, saved


SERVED_ROWS = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}] * 2


@pytest.mark.parametrize("template", ["alpaca", "chatml", "qwen3", None])
def test_the_saved_tokenizer_renders_what_training_used(template, tmp_path):
    trained, saved = _trained_and_served(tmp_path, SERVED_ROWS, {"template": template} if template else {})
    examples = {tuple(int(i) for i in e["input_ids"]): [int(i) for i in e["labels"]] for e in trained}
    for row in SERVED_ROWS:
        ids = saved.apply_chat_template(row["messages"], tokenize=True, return_dict=False)
        assert tuple(ids) in examples  # token for token, BOS included or not as trained
        labels = examples[tuple(ids)]
        prompt = saved.apply_chat_template(row["messages"][:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE  # served prompt, untrained
        assert labels[len(prompt)] == ids[len(prompt)]  # and the answer, trained, starts right after it


def test_a_jumpstart_run_saves_its_template_json_format(tmp_path):
    rows = [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(4)]
    files = {"template.json": '{"prompt": "Question: {question}", "completion": "{answer}"}'}
    trained, saved = _trained_and_served(tmp_path, rows, {"instruction_tuned": True,
                                                          "add_input_output_demarcation_key": True}, files)
    messages = [{"role": "user", "content": "Question: What is 0?"}, {"role": "assistant", "content": "It is 0."}]
    assert saved.apply_chat_template(messages, tokenize=True, return_dict=False) == [int(i) for i in trained[0]["input_ids"]]
