"""`lmtune score`: rewards from a trained reward model (an `rm` run), for texts or prompt/answer rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .data.batches import pad_batch
from .data.templates import pick_renderer
from .data.tokenize import encode_batch
from .errors import UserError
from .generate import RunNotFound, cannot_load_why, final_dir, run_meta


class ScoreInputError(UserError, ValueError):
    """A row `lmtune score` cannot read."""


def load_reward_model(location: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) of an rm run: a full sequence-classification model, or a PEFT adapter with its head."""
    from .model.unused_imports import import_modeling_without_scipy

    import_modeling_without_scipy()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .model.load import model_location

    folder = final_dir(location)
    source = str(folder) if folder.exists() else str(location)  # a hub id is the ordinary transformers path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise RunNotFound(f"{location}: neither a run folder nor a reward model that can be loaded ({error})") from None
    meta = run_meta(folder) if folder.exists() else {}
    if meta.get("stage") not in (None, "rm"):
        raise RunNotFound(f"{location}: was trained with stage: {meta['stage']}; score reads reward models (an rm run's folder); "
                          "ask a policy with `lmtune chat`")
    try:
        if (folder / "adapter_config.json").exists():
            from peft import PeftModel

            base_name = meta.get("base_model") or json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            base = AutoModelForSequenceClassification.from_pretrained(model_location(base_name), num_labels=1, use_safetensors=True)
            model = PeftModel.from_pretrained(base, folder)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True)
    except (OSError, ValueError, KeyError) as error:
        raise RunNotFound(f"{location}: {cannot_load_why(error)}") from None
    if model.config.num_labels != 1:
        raise RunNotFound(f"{location}: has {model.config.num_labels} outputs; a reward model has one (train it with stage: rm)")
    return model.eval().requires_grad_(False), tokenizer, meta


@torch.no_grad()
def score_sequences(model: Any, sequences: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The reward of each token sequence, read at its last token."""
    from .stages.reward import rewards

    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = pad_batch([{"input_ids": ids} for ids in chunk], pad_id)
        out += rewards(model, {k: v.to(device) for k, v in batch.items()}).tolist()
    return out


def conversation_ids(tokenizer: Any, meta: dict[str, Any], prompt: str, answers: list[str]) -> list[list[int]]:
    """prompt + each answer as the rm run saw them in training: its template, its answer end."""
    renderer = pick_renderer(tokenizer, meta.get("template"), False, meta.get("add_input_output_demarcation_key", False))
    texts = [renderer.prompt_and_answer([{"role": "user", "content": prompt}], answer) for answer in answers]
    return encode_batch(tokenizer, [prompt_text + answer_text for prompt_text, answer_text in texts])


def rows_of(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Rows of `text`, `prompt` + `answer`, or `prompt` + `chosen` + `rejected`; an alpaca-style `instruction` (+ `input`)
    is the prompt, as the rm data it was trained on writes it."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ScoreInputError(f"{path} line {number}: not JSON ({error.msg})") from None
        if isinstance(row, dict) and "prompt" not in row and row.get("instruction"):
            row = {**row, "prompt": f"{row['instruction']}\n\n{row['input']}" if row.get("input") else str(row["instruction"])}
        if not isinstance(row, dict) or not ({"text"} <= set(row) or {"prompt", "answer"} <= set(row) or {"prompt", "chosen", "rejected"} <= set(row)):
            raise ScoreInputError(f"{path} line {number}: a row needs `text`, or `prompt` (or `instruction`) and `answer`, "
                                  "or `prompt`, `chosen` and `rejected`")
        yield number, row


def score_file(model: Any, tokenizer: Any, meta: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """One result per row: `reward`, or `reward_chosen`, `reward_rejected` and whether the chosen one wins."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = []
    for _, row in rows_of(path):
        if "text" in row:
            results.append({"reward": score_sequences(model, [encode_batch(tokenizer, [str(row["text"])])[0]], pad)[0]})
        elif "answer" in row:
            ids = conversation_ids(tokenizer, meta, str(row["prompt"]), [str(row["answer"])])
            results.append({"reward": score_sequences(model, ids, pad)[0]})
        else:
            ids = conversation_ids(tokenizer, meta, str(row["prompt"]), [str(row["chosen"]), str(row["rejected"])])
            chosen, rejected = score_sequences(model, ids, pad)
            results.append({"reward_chosen": chosen, "reward_rejected": rejected, "chosen_wins": chosen > rejected})
    return results


def score_text(model: Any, tokenizer: Any, meta: dict[str, Any], text: Optional[str], prompt: Optional[str], answer: Optional[str]) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if prompt is not None:
        return score_sequences(model, conversation_ids(tokenizer, meta, prompt, [answer or ""]), pad)[0]
    return score_sequences(model, [encode_batch(tokenizer, [text or ""])[0]], pad)[0]
