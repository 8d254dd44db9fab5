"""Canonical records to token ids and labels (-100 where nothing is learned)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Optional

from .templates import Renderer, Segment

IGNORE = -100


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """One call into the Rust tokenizer for many texts; never adds special tokens."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def join_segments(pieces: list[list[int]], segments: list[Segment]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for tokens, (_, trained) in zip(pieces, segments):
        ids += tokens
        labels += tokens if trained else [IGNORE] * len(tokens)
    return ids, labels


def _last_answer_start(labels: list[int]) -> Optional[int]:
    index = len(labels) - 1
    while index >= 0 and labels[index] == IGNORE:
        index -= 1
    if index < 0:
        return None
    while index > 0 and labels[index - 1] != IGNORE:
        index -= 1
    return index


def fit_length(
    ids: list[int], labels: list[int], max_len: int, policy: str, bos_id: Optional[int]
) -> tuple[Optional[list[int]], Optional[list[int]], str]:
    """Apply the truncation policy; returns (ids, labels, "kept" | "truncated" | "dropped: reason").

    keep_response cuts the prompt from the left (BOS stays) when the last answer
    fits; when the answer alone is too long, it falls back to cutting the end.
    """
    if len(ids) <= max_len:
        return ids, labels, "kept"
    if policy == "drop":
        return None, None, "dropped: longer than max_input_length"
    if policy == "keep_response":
        keep_bos = bos_id is not None and ids[:1] == [bos_id]
        room = max_len - (1 if keep_bos else 0)
        answer = _last_answer_start(labels)
        if answer is not None and len(ids) - answer == room and any(label == IGNORE for label in labels[1:answer]):
            # The answer would fill the whole row: trained without any of the prompt it answers.
            return None, None, "dropped: no room for the prompt beside the answer in max_input_length"
        if answer is not None and len(ids) - answer <= room:
            head_ids, head_labels = ([bos_id], [IGNORE]) if keep_bos else ([], [])
            return head_ids + ids[-room:], head_labels + labels[-room:], "truncated"
    new_ids, new_labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in new_labels):
        return None, None, "dropped: no answer token fits in max_input_length"
    return new_ids, new_labels, "truncated"


def tokenize_sequences(
    records: list[dict[str, Any]], renderer: Renderer, tokenizer: Any, max_len: int, policy: str
) -> tuple[list[dict[str, list[int]]], Counter]:
    """sft, ppo and grpo records: one sequence each."""
    rendered = [renderer.record(r) for r in records]
    flat = [text for segments in rendered for text, _ in segments]
    pieces = encode_batch(tokenizer, flat)
    examples, outcomes = [], Counter()
    prompts_only = bool(records) and records[0]["kind"] == "prompt"
    at = 0
    for record, segments in zip(records, rendered):
        ids, labels = join_segments(pieces[at : at + len(segments)], segments)
        at += len(segments)
        if prompts_only:  # RL prompts are kept whole or cut at the left; their other columns travel as JSON
            outcomes["kept" if len(ids) <= max_len else "truncated"] += 1
            user = [m["content"] for m in record["messages"] if m["role"] == "user"]
            example = {"input_ids": ids[-max_len:], "prompt_text": list((user[-1] if user else "").encode())}
            if record.get("columns"):
                example["columns"] = list(json.dumps(record["columns"]).encode())
            examples.append(example)
            continue
        if record.get("drop"):
            outcomes[f"dropped: {record['drop']}"] += 1
            continue
        ids, labels, outcome = fit_length(ids, labels, max_len, policy, tokenizer.bos_token_id)
        outcomes[outcome] += 1
        if ids is not None:
            examples.append({"input_ids": ids, "labels": labels})
    return examples, outcomes


def tokenize_preferences(
    records: list[dict[str, Any]], renderer: Renderer, tokenizer: Any, max_len: int, policy: str
) -> tuple[list[dict[str, list[int]]], Counter]:
    """rm/dpo records: the prompt once, the chosen and rejected answers after it."""
    suffix = renderer.answer_end()
    prompts = [renderer.chat(r["messages"], add_answer_prefix=True) for r in records]
    flat = [text for segments in prompts for text, _ in segments]
    answers = [a + suffix for r in records for a in (r["chosen"], r["rejected"])]
    prompt_pieces = encode_batch(tokenizer, flat)
    answer_pieces = encode_batch(tokenizer, answers)
    examples, outcomes = [], Counter()
    at = 0
    for index, segments in enumerate(prompts):
        prompt_ids = [t for piece in prompt_pieces[at : at + len(segments)] for t in piece]
        at += len(segments)
        if records[index].get("drop"):
            outcomes[f"dropped: {records[index]['drop']}"] += 1
            continue
        pair, outcome = {}, "kept"
        for side, answer_ids in (("chosen", answer_pieces[2 * index]), ("rejected", answer_pieces[2 * index + 1])):
            ids = prompt_ids + answer_ids
            labels = [IGNORE] * len(prompt_ids) + answer_ids
            ids, labels, result = fit_length(ids, labels, max_len, policy, tokenizer.bos_token_id)
            if ids is None:
                outcome = result
                break
            if result == "truncated":
                outcome = result
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, labels
        outcomes[outcome] += 1
        if len(pair) == 4:
            if "margin" in records[index]:
                pair["margin"] = [records[index]["margin"]]
            examples.append(pair)
    return examples, outcomes


def tokenize_unpaired(
    records: list[dict[str, Any]], renderer: Renderer, tokenizer: Any, max_len: int, policy: str
) -> tuple[list[dict[str, list[int]]], Counter]:
    """kto records: the prompt, then the answer; `label` is 1 for a desirable answer."""
    suffix = renderer.answer_end()
    prompts = [renderer.chat(r["messages"], add_answer_prefix=True) for r in records]
    prompt_pieces = encode_batch(tokenizer, [text for segments in prompts for text, _ in segments])
    answer_pieces = encode_batch(tokenizer, [r["completion"] + suffix for r in records])
    examples, outcomes = [], Counter()
    at = 0
    for record, segments, answer_ids in zip(records, prompts, answer_pieces):
        prompt_ids = [t for piece in prompt_pieces[at : at + len(segments)] for t in piece]
        at += len(segments)
        ids, labels = prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids
        ids, labels, outcome = fit_length(ids, labels, max_len, policy, tokenizer.bos_token_id)
        outcomes[outcome] += 1
        if ids is not None:
            examples.append({"input_ids": ids, "labels": labels, "label": [int(record["label"])]})
    return examples, outcomes


def example_columns(example: dict[str, Any]) -> dict[str, Any]:
    """A prompt example's other columns (stored as the bytes of their JSON)."""
    if "columns" not in example:
        return {}
    return json.loads(bytes(int(b) for b in example["columns"]).decode())


def example_prompt_text(example: dict[str, Any]) -> str:
    """A prompt example's last user turn as written in the data (what reward functions get as the prompt)."""
    return bytes(int(b) for b in example.get("prompt_text", [])).decode()


def tokenize_text(
    records: list[dict[str, Any]], tokenizer: Any, max_len: int
) -> tuple[list[dict[str, list[int]]], Counter]:
    """pt records: documents joined with the end token, cut into blocks of max_len."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for tokens in encode_batch(tokenizer, [r["text"] for r in records]):
        stream += tokens + ([eos] if eos is not None else [])
    examples = [{"input_ids": stream[i : i + max_len]} for i in range(0, len(stream), max_len)]
    examples = [e for e in examples if len(e["input_ids"]) > 1]
    for example in examples:
        example["labels"] = list(example["input_ids"])
    return examples, Counter({"kept": len(records)})


def tokenize_records(
    records: list[dict[str, Any]], renderer: Renderer, tokenizer: Any, max_len: int, policy: str
) -> tuple[list[dict[str, list[int]]], Counter]:
    if not records:
        return [], Counter()
    kind = records[0]["kind"]
    if kind == "text":
        return tokenize_text(records, tokenizer, max_len)
    if kind == "preference":
        return tokenize_preferences(records, renderer, tokenizer, max_len, policy)
    if kind == "unpaired":
        return tokenize_unpaired(records, renderer, tokenizer, max_len, policy)
    return tokenize_sequences(records, renderer, tokenizer, max_len, policy)
