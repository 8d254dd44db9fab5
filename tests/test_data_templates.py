"""Every dataset format through every template: the exact text, and exactly which part is trained."""

import pytest

from lmtune.data.records import Row, normalise
from lmtune.data.templates import TEMPLATES, Renderer, pick_renderer
from lmtune.data.tokenize import IGNORE, tokenize_records

ROWS = {
    "instruction": ("instruction", {"instruction": "Add the numbers.", "input": "1 2", "output": "3"}),
    "chat": (
        "chat",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"},
            ]
        },
    ),
    "sharegpt": ("chat", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}),
    "prompt": ("prompt", {"prompt": "Hi"}),
}

# (text, trained) segments, written out by hand for each format and template.
EXPECTED = {
    ("instruction", "llama3"): [
        ("<s><|start_header_id|>user<|end_header_id|>\n\nAdd the numbers.\n\n1 2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("3<|eot_id|>", True),
    ],
    ("instruction", "chatml"): [
        ("<|im_start|>user\nAdd the numbers.\n\n1 2<|im_end|>\n<|im_start|>assistant\n", False),
        ("3<|im_end|>\n", True),
    ],
    ("instruction", "mistral"): [("<s>[INST] Add the numbers.\n\n1 2 [/INST]", False), ("3</s>", True)],
    ("instruction", "alpaca"): [
        ("<s>### Instruction:\nAdd the numbers.\n\n1 2\n\n### Response:\n", False),
        ("3</s>", True),
    ],
    ("instruction", "plain"): [("<s>Add the numbers.\n\n1 2\n", False), ("3</s>", True)],
    ("chat", "llama3"): [
        (
            "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            False,
        ),
        ("Hello<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Ciao<|eot_id|>", True),
    ],
    ("chat", "chatml"): [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("Ciao<|im_end|>\n", True),
    ],
    ("chat", "mistral"): [
        ("<s>[INST] Be brief.\n\nHi [/INST]", False),
        ("Hello</s>", True),
        ("[INST] Bye [/INST]", False),
        ("Ciao</s>", True),
    ],
    ("chat", "alpaca"): [
        ("<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\n", False),
        ("Hello</s>", True),
        ("### Instruction:\nBye\n\n### Response:\n", False),
        ("Ciao</s>", True),
    ],
    ("chat", "plain"): [
        ("<s>Be brief.\n\nHi\n", False),
        ("Hello</s>", True),
        ("Bye\n", False),
        ("Ciao</s>", True),
    ],
    ("sharegpt", "llama3"): [
        ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Hello<|eot_id|>", True),
    ],
    ("sharegpt", "chatml"): [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False), ("Hello<|im_end|>\n", True)],
    ("sharegpt", "mistral"): [("<s>[INST] Hi [/INST]", False), ("Hello</s>", True)],
    ("sharegpt", "alpaca"): [("<s>### Instruction:\nHi\n\n### Response:\n", False), ("Hello</s>", True)],
    ("sharegpt", "plain"): [("<s>Hi\n", False), ("Hello</s>", True)],
    ("prompt", "llama3"): [
        ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False)
    ],
    ("prompt", "chatml"): [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False)],
    ("prompt", "mistral"): [("<s>[INST] Hi [/INST]", False)],
    ("prompt", "alpaca"): [("<s>### Instruction:\nHi\n\n### Response:\n", False)],
    ("prompt", "plain"): [("<s>Hi\n", False)],
}


def renderer(name, **kwargs):
    return Renderer(TEMPLATES[name], bos_token="<s>", eos_token="</s>", **kwargs)


@pytest.mark.parametrize("fmt,template", sorted(EXPECTED))
def test_rendered_segments(fmt, template):
    kind, values = ROWS[fmt]
    record = normalise(Row(values, "row 1"), kind)
    assert renderer(template).record(record) == EXPECTED[(fmt, template)]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_preference_prompt_and_answers(template):
    record = normalise(Row({"prompt": "Hi", "chosen": "Good", "rejected": "Bad"}, "row 1"), "preference")
    assert record["chosen"] == "Good" and record["rejected"] == "Bad"
    assert renderer(template).chat(record["messages"], add_answer_prefix=True) == EXPECTED[("prompt", template)]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_train_on_inputs_trains_everything(template):
    kind, values = ROWS["chat"]
    segments = renderer(template, train_on_inputs=True).record(normalise(Row(values, "r"), kind))
    assert all(trained for _, trained in segments)
    assert [text for text, _ in segments] == [text for text, _ in EXPECTED[("chat", template)]]


def test_jumpstart_template_rows_with_demarcation():
    from lmtune.data.records import render_jumpstart

    template = {"prompt": "Q: {question}\n", "completion": " {answer}"}
    record = render_jumpstart(Row({"question": "2+2?", "answer": "4"}, "r"), template)
    assert record == {"kind": "completion", "prompt": "Q: 2+2?\n", "completion": " 4"}
    assert Renderer(None, "<s>", "</s>").completion(record["prompt"], record["completion"]) == [
        ("<s>Q: 2+2?\n", False),
        (" 4</s>", True),
    ]
    assert Renderer(None, "<s>", "</s>", demarcation=True).completion(record["prompt"], record["completion"]) == [
        ("<s>Q: 2+2?\n### Response:\n", False),
        (" 4</s>", True),
    ]


def test_demarcation_marks_instruction_prompts_in_chat_templates():
    record = normalise(Row(ROWS["instruction"][1], "r"), "instruction")
    segments = renderer("chatml", demarcation=True).record(record)
    assert segments[0][0] == "<|im_start|>user\nAdd the numbers.\n\n1 2\n\n### Response:<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizers_own_template(tokenizer):
    """No `template:` and a tokenizer with a chat template: its rendering, split at each answer."""
    kind, values = ROWS["chat"]
    own = pick_renderer(tokenizer, None, False, False)
    segments = own.record(normalise(Row(values, "r"), kind))
    assert segments == [
        ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>\n", True),
        ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("Ciao<|im_end|>\n", True),
    ]


TOKEN_TEMPLATES = ["llama3", "chatml", "mistral", "alpaca", "plain", None]


@pytest.mark.parametrize("template", TOKEN_TEMPLATES)
def test_token_labels_match_the_trained_segments_and_bos_appears_once(template, fresh_tokenizer):
    fresh_tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]}
    )
    chosen = pick_renderer(fresh_tokenizer, template, False, False)
    kind, values = ROWS["chat"]
    record = normalise(Row(values, "r"), kind)
    [example], outcomes = tokenize_records([record], chosen, fresh_tokenizer, 512, "keep_response")
    ids, labels = example["input_ids"], example["labels"]
    segments = chosen.record(record)
    expected_labels = []
    for text, trained in segments:
        piece = fresh_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_labels += piece if trained else [IGNORE] * len(piece)
    assert labels == expected_labels
    assert [i for i, label in zip(ids, labels) if label != IGNORE] == [l for l in labels if l != IGNORE]
    bos = fresh_tokenizer.bos_token_id
    writes_bos = template is None or TEMPLATES[template].bos
    assert ids.count(bos) == (1 if writes_bos else 0)
    if writes_bos:
        assert ids[0] == bos
    trained_text = fresh_tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert "Hello" in trained_text and "Ciao" in trained_text and "Hi" not in trained_text


def test_template_that_does_not_fit_the_tokenizer(tokenizer):
    from lmtune.data.records import DataError

    with pytest.raises(DataError, match="template llama3 writes <\\|start_header_id\\|>"):
        pick_renderer(tokenizer, "llama3", False, False)
