"""Canonical records to token ids and labels (-100 where nothing is learned)."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from itertools import chain
from typing import Any, Optional

import numpy as np

from .records import DataError
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


class RustEncoder:
    """What a tokenising worker needs of a fast tokenizer: its Rust tokenizer and its special ids. It pickles
    without transformers, so a worker starts by importing `tokenizers` alone (seconds less per worker), and it
    encodes exactly as the tokenizer does when no truncation or padding is set on it (`_backend`)."""

    is_fast = True

    def __init__(self, tokenizer: Any):
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids for e in self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]}


def for_workers(tokenizer: Any, renderer: Renderer) -> Any:
    """The tokenizer as workers get it: a RustEncoder when that encodes the same (a fast tokenizer, and a named
    format, which renders without the tokenizer), else the tokenizer itself."""
    if _backend(tokenizer) is None or renderer.chat_template_owner is not None:
        return tokenizer
    return RustEncoder(tokenizer)


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast one, when calling it directly gives what the tokenizer gives (no
    truncation or padding set on it); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def _labels_by_offsets(ids: list[int], offsets: list[tuple[int, int]], segments: list[Segment]) -> list[int]:
    """A token is trained when it overlaps a trained segment."""
    spans, at = [], 0
    for text, trained in segments:
        if trained:
            spans.append((at, at + len(text)))
        at += len(text)
    labels, span = [], 0
    for token, (start, end) in zip(ids, offsets):
        end = max(end, start + 1)
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        labels.append(token if span < len(spans) and spans[span][0] < end else IGNORE)
    return labels


def _labels_by_characters(encoding: Any, ids: list[int], segments: list[Segment]) -> Optional[list[int]]:
    """The same labels from each trained segment's first and last character (a few lookups per example, not
    one per token); None when a character maps to no token (a normaliser dropped it)."""
    labels = [IGNORE] * len(ids)
    at = 0
    for text, trained in segments:
        if trained and text:
            first, last = encoding.char_to_token(at), encoding.char_to_token(at + len(text) - 1)
            if first is None or last is None:
                return None
            labels[first : last + 1] = ids[first : last + 1]
        at += len(text)
    return labels


_BYTE_TABLES: dict[int, tuple[Any, Optional[np.ndarray]]] = {}  # id(backend) -> (backend, its table), per process


def byte_lengths(backend: Any) -> Optional[np.ndarray]:
    """Each token's length in bytes of the text, for a byte-level tokenizer whose tokens are exact byte spans of
    the text it was given (no normaliser, offsets never trimmed); None for any other. With it, a token's place in
    the text is the sum of the lengths before it, and the tokenizer need not track offsets (a quarter of its time)."""
    held = _BYTE_TABLES.get(id(backend))
    if held is not None and held[0] is backend:
        return held[1]
    table = _byte_table(backend)
    _BYTE_TABLES[id(backend)] = (backend, table)
    return table


def _parts(part: Any, key: str) -> list[dict[str, Any]]:
    """A tokenizer.json component as its list of parts (a Sequence unrolled)."""
    if not part:
        return []
    if part.get("type") == "Sequence":
        return [inner for p in part.get(key, []) for inner in _parts(p, key)]
    return [part]


def _byte_table(backend: Any) -> Optional[np.ndarray]:
    from tokenizers import pre_tokenizers

    spec = json.loads(backend.to_str())
    trims = any(p.get("type") == "ByteLevel" and p.get("trim_offsets") for p in _parts(spec.get("post_processor"), "processors"))
    byte_level = (any(p.get("type") == "ByteLevel" for p in _parts(spec.get("pre_tokenizer"), "pretokenizers"))
                  and [d.get("type") for d in _parts(spec.get("decoder"), "decoders")] == ["ByteLevel"])
    if spec.get("normalizer") not in (None, {"type": "NFC"}) or trims or not byte_level:
        return None  # NFC (Qwen's) leaves text already in NFC as it is: encode_examples checks that, text by text
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    vocab = backend.get_vocab(with_added_tokens=True)
    table = np.zeros(max(vocab.values(), default=-1) + 1, dtype=np.int64)
    for token, index in vocab.items():
        if index in added:
            table[index] = len(added[index].encode())
        elif set(token) <= alphabet:
            table[index] = len(token)  # one alphabet character a byte
        else:
            return None
    return table


def _labels_by_bytes(encoded: list[list[int]], table: np.ndarray, examples: list[list[Segment]]) -> list[Optional[list[int]]]:
    """Labels of a chunk's examples from their tokens' byte lengths, in a few array passes for the whole chunk: a
    token is trained from the one that holds a trained segment's first byte to the one that holds the first byte
    of its last character (what `_labels_by_characters` gives). None for an example whose tokens do not add up to
    its text's bytes (an added token that swallows the spaces beside it): it is labelled from offsets instead."""
    counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=int(counts.sum()))
    ends = np.cumsum(table[ids])  # each token's end in the chunk's bytes, examples end to end
    first = np.cumsum(counts) - counts
    bounds = np.concatenate(([0], ends))
    base = bounds[first]  # where each example's bytes begin
    marks, fits = [], []
    for start, held, segments in zip(base.tolist(), (bounds[first + counts] - base).tolist(), examples):
        at, own = start, []
        for text, trained in segments:
            size = len(text.encode())
            if trained and text:
                own.append((at, at + size - len(text[-1].encode())))
            at += size
        fits.append(at - start == held)
        if fits[-1]:  # an example that does not add up marks nothing: its marks could fall in the next one's tokens
            marks += own
    trained = np.zeros(len(ids) + 1, dtype=np.int64)
    if marks:
        spans = np.searchsorted(ends, np.asarray(marks, dtype=np.int64), side="right")  # the token holding each byte
        np.add.at(trained, spans[:, 0], 1)
        np.add.at(trained, spans[:, 1] + 1, -1)
    labels = np.where(np.cumsum(trained[:-1]) > 0, ids, IGNORE).tolist()
    return [labels[s : s + n] if ok else None for s, n, ok in zip(first.tolist(), counts.tolist(), fits)]


def encode_examples(tokenizer: Any, examples: list[list[Segment]]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each example. Its whole text is tokenised in one piece, as `apply_chat_template` does, so
    the ids are the ones the model is served with; a token is trained when it overlaps a trained segment."""
    if not examples:
        return []
    texts = ["".join(text for text, _ in segments) for segments in examples]
    backend = _backend(tokenizer)
    table = byte_lengths(backend) if backend is not None else None
    if table is not None and backend.normalizer is not None and not all(unicodedata.is_normalized("NFC", t) for t in texts):
        table = None
    if table is not None and hasattr(backend, "encode_batch_fast"):
        encoded = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        labelled = _labels_by_bytes(encoded, table, examples)
        if all(labels is not None for labels in labelled):
            return list(zip(encoded, labelled))
    if backend is not None:
        out = []
        for encoding, segments in zip(backend.encode_batch(texts, add_special_tokens=False), examples):
            ids = encoding.ids  # a new list each time it is read
            labels = _labels_by_characters(encoding, ids, segments)
            out.append((ids, labels if labels is not None else _labels_by_offsets(ids, encoding.offsets, segments)))
        return out
    if not getattr(tokenizer, "is_fast", False):  # no offsets: segment by segment
        flat = encode_batch(tokenizer, [text for segments in examples for text, _ in segments])
        out, at = [], 0
        for segments in examples:
            out.append(join_segments(flat[at : at + len(segments)], segments))
            at += len(segments)
        return out
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(ids, _labels_by_offsets(ids, offsets, segments))
            for ids, offsets, segments in zip(encoded["input_ids"], encoded["offset_mapping"], examples)]


def template_refusal(exc: Exception) -> Optional[str]:
    """The reason a row cannot be rendered: the chat template's own message, or lmtune's; None for other errors."""
    from jinja2 import TemplateError

    if isinstance(exc, TemplateError):
        return f"the chat template refuses it ({exc})"
    if isinstance(exc, DataError):
        return str(exc)
    return None


def render_each(render: Any, records: list[dict[str, Any]]) -> tuple[list[Any], Counter]:
    """render(record) for each record; a record the template refuses becomes None and is counted with the reason."""
    out, refused = [], Counter()
    for record in records:
        try:
            out.append(render(record))
        except Exception as exc:
            reason = template_refusal(exc)
            if reason is None:
                raise
            refused[f"dropped: {reason} (first: {record.get('where', 'a row')})"] += 1
            out.append(None)
    return out, refused


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
    """sft, ppo and grpo records: one sequence each (one per answer where the template rewrites earlier turns)."""
    renderer.notes.clear()
    rendered, outcomes = render_each(renderer.examples, records)
    outcomes.update(renderer.notes)
    flat = [segments for examples in rendered if examples for segments in examples]
    encoded = iter(encode_examples(tokenizer, flat))
    examples = []
    bos_id = tokenizer.bos_token_id  # a property that looks the token up: once, not per example
    prompts_only = bool(records) and records[0]["kind"] == "prompt"
    for record, record_examples in zip(records, rendered):
        if record_examples is None:
            continue
        pieces = [next(encoded) for _ in record_examples]
        if prompts_only:  # RL prompts are kept whole or cut at the left; their other columns travel as JSON
            ids = pieces[0][0]
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
        for ids, labels in pieces:
            ids, labels, outcome = fit_length(ids, labels, max_len, policy, bos_id)
            outcomes[outcome] += 1
            if ids is not None:
                examples.append({"input_ids": ids, "labels": labels})
    return examples, outcomes


def _prompts_and_answers(
    records: list[dict[str, Any]], renderer: Renderer, answers: Any
) -> tuple[list[Optional[list[tuple[str, str]]]], Counter]:
    """Each record's (prompt, answer) texts, one per answer `answers(record)` names."""
    return render_each(lambda r: [renderer.prompt_and_answer(r["messages"], a) for a in answers(r)], records)


def _prompt_answer_ids(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """ids and labels of prompt + answer texts (the answer trained), each tokenised whole."""
    return encode_examples(tokenizer, [[(prompt, False), (answer, True)] for prompt, answer in pairs])


def tokenize_preferences(
    records: list[dict[str, Any]], renderer: Renderer, tokenizer: Any, max_len: int, policy: str
) -> tuple[list[dict[str, list[int]]], Counter]:
    """rm/dpo records: the prompt once, the chosen and rejected answers after it."""
    texts, outcomes = _prompts_and_answers(records, renderer, lambda r: (r["chosen"], r["rejected"]))
    encoded = iter(_prompt_answer_ids(tokenizer, [pair for pairs in texts if pairs for pair in pairs]))
    examples = []
    for record, pairs in zip(records, texts):
        if pairs is None:
            continue
        sides = [next(encoded), next(encoded)]
        if record.get("drop"):
            outcomes[f"dropped: {record['drop']}"] += 1
            continue
        pair, outcome = {}, "kept"
        for side, (ids, labels) in zip(("chosen", "rejected"), sides):
            ids, labels, result = fit_length(ids, labels, max_len, policy, tokenizer.bos_token_id)
            if ids is None:
                outcome = result
                break
            if result == "truncated":
                outcome = result
            pair[f"{side}_input_ids"], pair[f"{side}_labels"] = ids, labels
        outcomes[outcome] += 1
        if len(pair) == 4:
            if "margin" in record:
                pair["margin"] = [record["margin"]]
            examples.append(pair)
    return examples, outcomes


def tokenize_unpaired(
    records: list[dict[str, Any]], renderer: Renderer, tokenizer: Any, max_len: int, policy: str
) -> tuple[list[dict[str, list[int]]], Counter]:
    """kto records: the prompt, then the answer; `label` is 1 for a desirable answer."""
    texts, outcomes = _prompts_and_answers(records, renderer, lambda r: (r["completion"],))
    encoded = iter(_prompt_answer_ids(tokenizer, [pair for pairs in texts if pairs for pair in pairs]))
    examples = []
    for record, pairs in zip(records, texts):
        if pairs is None:
            continue
        ids, labels = next(encoded)
        ids, labels, outcome = fit_length(ids, labels, max_len, policy, tokenizer.bos_token_id)
        outcomes[outcome] += 1
        if ids is not None:
            examples.append({"input_ids": ids, "labels": labels, "label": [int(record["label"])]})
    return examples, outcomes


def example_columns(example: dict[str, Any]) -> dict[str, Any]:
    """A prompt example's other columns (stored as the bytes of their JSON)."""
    if len(example.get("columns", ())) == 0:
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
