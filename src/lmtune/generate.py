"""Answers from a trained run, rendered with the same template as training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from .data.templates import pick_renderer
from .data.tokenize import encode_batch
from .errors import UserError


class RunNotFound(UserError, FileNotFoundError):
    """A path given as a trained run holds no model."""


def run_meta(run: Path) -> dict[str, Any]:
    """What a run's final/ folder says about how it was trained."""
    meta_path = run / "lmtune.json"
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def final_dir(run: str | Path) -> Path:
    path = Path(run)
    return path / "final" if (path / "final" / "lmtune.json").exists() else path


def load_for_inference(run: str | Path, merge: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, meta) of a run folder: a PEFT adapter over its base, or a full model."""
    from .model.unused_imports import import_modeling_without_scipy

    import_modeling_without_scipy()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model.load import model_location

    folder = final_dir(run)
    if not folder.is_dir() or not any((folder / name).exists() for name in ("lmtune.json", "config.json", "adapter_config.json")):
        raise RunNotFound(
            f"{run}: not a trained run (no model in it or in its final/ folder); give a run's output_dir or its final/ folder"
        )
    meta = run_meta(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if (folder / "adapter_config.json").exists():
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(model_location(meta["base_model"]), use_safetensors=True)
            model = PeftModel.from_pretrained(base, folder)
            if merge:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, KeyError) as error:  # pickle-only weights, a model's own code, a broken folder
        raise RunNotFound(f"{run}: {cannot_load_why(error)}") from None
    model.eval()
    return model, tokenizer, meta


def cannot_load_why(error: Exception) -> str:
    """One line for a model folder transformers refuses: safetensors only, no remote code, or its own words."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "safetensors" in text.lower() or ".bin" in text:
        return "its weights are not in safetensors (pickle files can run code when loaded); convert them to safetensors"
    if "trust_remote_code" in text:
        return "the model ships its own code; lmtune runs it only for a training config with trust_remote_code: true"
    return f"cannot be loaded ({type(error).__name__}: {text})"


def generation_settings(run: str | Path) -> dict[str, Any]:
    """The generation settings of the config a run was trained with (its config.resolved.yaml)."""
    import yaml

    path = Path(run)
    resolved = path / "config.resolved.yaml" if (path / "config.resolved.yaml").exists() else path.parent / "config.resolved.yaml"
    flat = yaml.safe_load(resolved.read_text()) if resolved.exists() else {}
    keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {k: flat[k] for k in keys if k in flat}


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def answer(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    template: Optional[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    demarcation: bool = False,
) -> list[str]:
    """Greedy (or sampled) answers to conversations that end with a user turn."""
    renderer = pick_renderer(tokenizer, template, False, demarcation)
    texts = ["".join(text for text, _ in renderer.chat(messages, add_answer_prefix=True)) for messages in prompts]
    encoded = encode_batch(tokenizer, texts)
    longest = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    # Left padding so every prompt ends where its answer starts.
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in encoded])
    attention = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in encoded])
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {"do_sample": False}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids(tokenizer, model),
        pad_token_id=pad,
        repetition_penalty=repetition_penalty,
        **sampling,
    )
    return [tokenizer.decode(row[longest:], skip_special_tokens=True).strip() for row in output]
