"""Tokenizer and model from a local folder, a hub id or `builtin:`, the ordinary transformers way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config.schema import Config
from ..config.method import trains_adapters
from ..errors import UserError
from .builtin import builtin_path, is_builtin

DROPOUT_FIELDS = (
    "attention_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
)


class ModelError(UserError, ValueError):
    """A model that cannot be used as configured; the message names the key and the fix."""



def quiet_library_warnings() -> None:
    """Warnings the libraries raise that a user can do nothing about: peft calls a transformers method that
    transformers itself marks deprecated, and bitsandbytes' int8 layers say on every call that they cast their
    input to fp16 (as they must; lmtune's int8 runs expect it)."""
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="`gradient_checkpointing_enable` is deprecated", category=FutureWarning)
    # peft's mapping of transformers 4 expert names onto fused experts leaves a rank pattern a model may not use
    warnings.filterwarnings("ignore", message="The following alpha_pattern keys did not match", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match", category=RuntimeWarning)
    import logging

    logging.getLogger("bitsandbytes.autograd").setLevel(logging.ERROR)  # "MatMul8bitLt: inputs will be cast ..." per call


def model_location(name: str) -> str:
    if is_builtin(name):
        try:
            return str(builtin_path(name))
        except ValueError as exc:
            raise ModelError(str(exc)) from None
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ModelError(f"base_model: {name}: no such folder; give a model folder, a hub id or builtin:tiny")
    return name


def _cannot_load(what: str, where: str, exc: Exception) -> ModelError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"{what}: cannot load {where}: {reason}")


def compute_dtype(config: Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision.precision]


def load_tokenizer(config: Config, location: str | None = None) -> Any:
    from transformers import AutoTokenizer

    m = config.model
    where = location or model_location(m.tokenizer or m.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=m.model_revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _cannot_load("tokenizer" if m.tokenizer else "base_model", where, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is never trained, so any id will do
    return tokenizer


def _has_safetensors(where: str) -> bool:
    folder = Path(where)
    if folder.is_dir():
        return any(folder.glob("*.safetensors"))
    return True  # a hub id: transformers prefers safetensors and we insist below


def quantization_config(config: Config) -> Any:
    f = config.finetuning
    if not (f.method == "qlora" or f.int8_quantization):
        return None
    from transformers import BitsAndBytesConfig

    if f.method == "qlora":
        compute = compute_dtype(config)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=f.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=f.bnb_4bit_double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model_config(config: Config, location: str | None = None) -> Any:
    """The model's config.json alone: its context length and dropout fields, without the weights."""
    from transformers import AutoConfig

    m = config.model
    if not m.base_model and location is None:
        raise ModelError("base_model: no model given; set a folder, a hub id or builtin:tiny")
    where = location or model_location(m.base_model)
    try:
        return AutoConfig.from_pretrained(where, revision=m.model_revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _cannot_load("base_model", where, exc) from None


def load_model(config: Config, location: str | None = None, head: str = "lm") -> Any:
    """The base model with its language-model head, or (`head="reward"`) with one scalar output (rm)."""
    from .unused_imports import import_modeling_without_scipy

    import_modeling_without_scipy()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m, f = config.model, config.finetuning
    if not m.base_model and location is None:
        raise ModelError("base_model: no model given; set a folder, a hub id or builtin:tiny")
    where = location or model_location(m.base_model)
    if not m.allow_pickle_weights and not _has_safetensors(where):
        raise ModelError(
            f"base_model: {where} has no .safetensors weights; pickle (.bin) files can run code when loaded. "
            "Convert them, or set allow_pickle_weights: true for files you trust"
        )
    model_config = load_model_config(config, where)
    if config.training.dropout is not None:
        for key in DROPOUT_FIELDS:
            if hasattr(model_config, key):
                setattr(model_config, key, config.training.dropout)
    quant = quantization_config(config)
    # Frozen bases can live in the compute dtype; trained weights stay fp32 (autocast does the rest).
    frozen_base = trains_adapters(f.method)
    weights_dtype = compute_dtype(config) if frozen_base else torch.float32
    kwargs: dict[str, Any] = dict(
        config=model_config,
        revision=m.model_revision,
        trust_remote_code=m.trust_remote_code,
        dtype=weights_dtype,
        use_safetensors=None if m.allow_pickle_weights else True,
    )
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    auto = AutoModelForCausalLM
    if head == "reward":
        auto = AutoModelForSequenceClassification
        model_config.num_labels = 1
        if model_config.pad_token_id is None:  # transformers finds the last token by it; lmtune sets the real one at save
            model_config.pad_token_id = model_config.eos_token_id if isinstance(model_config.eos_token_id, int) else 0
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": _device_index()}
    try:
        model = _quietly(auto.from_pretrained, where, **kwargs)
    except (ImportError, OSError) as exc:
        raise _cannot_load("base_model", where, exc) from None
    except ValueError as exc:  # e.g. no sequence-classification class for this architecture
        raise _cannot_load("base_model", where, exc) from None
    if head == "reward":
        model.score.to(torch.float32)  # the head is always trained: full precision, as LoRA weights are
    model.config.use_cache = False
    return model


def _quietly(load: Any, *args: Any, **kwargs: Any) -> Any:
    """A reward model's new head is reported as "newly initialized"; that is the point of it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def _device_index() -> Any:
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def context_length(model_or_config: Any) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges this process maps from files (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path: a file
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def own_mapped_weights(model: torch.nn.Module) -> int:
    """Give trainable weights still inside the checkpoint's memory map memory of their own; returns how many moved.

    transformers maps safetensors files privately, so the first optimizer step copies every 4 KiB page of a
    trained weight on write, a page fault each. Measured on the 25M-parameter benchmark model (2-core VM): the
    first step's AdamW took 0.45 s this way, and 0.04 s after copying the weights, which took 0.03 s. Frozen
    weights stay mapped: they are only read, and processes on one host share those pages."""
    ranges = _file_mappings()
    moved = 0
    with torch.no_grad():
        for parameter in model.parameters():
            if not (parameter.requires_grad and parameter.device.type == "cpu"):
                continue
            address = parameter.data_ptr()
            if any(start <= address < end for start, end in ranges):
                parameter.data = parameter.data.clone()
                moved += 1
    return moved
