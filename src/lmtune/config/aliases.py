"""Settings under the names other tools give them.

Three kinds of foreign key:
- renames: the same setting, another name (built from the schema's per-field names);
- translations: a key whose value says something about one or more lmtune
  settings (`adapter: qlora`, `bf16: true`, `rl: dpo`, ...);
- keys lmtune knows but does not use: ignored with a warning, or refused with
  the fix when using them would change what the run means.
"""

from __future__ import annotations

from typing import Any, Callable

from ..data.templates import TEMPLATE_NAMES
from .schema import KEY_GROUP, TOOLS, field_info

TOOL_LABEL = {
    "jumpstart": "SageMaker JumpStart",
    "axolotl": "Axolotl",
    "llamafactory": "LLaMA-Factory",
    "torchtune": "torchtune",
    "accelerate": "accelerate",
    "trl": "TRL",
    "swift": "ms-swift",
}


class AliasError(ValueError):
    """A foreign key whose value lmtune cannot take; the message holds the fix."""


def _renames() -> dict[str, tuple[str, list[str]]]:
    """foreign name -> (lmtune key, tools that use that name)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for key in KEY_GROUP:
        names = (field_info(key).json_schema_extra or {}).get("names", {})
        for tool in TOOLS:
            for name in names.get(tool, []):
                if name == key:
                    continue
                known = table.setdefault(name, (key, []))
                assert known[0] == key, f"alias {name} points at {known[0]} and {key}"
                known[1].append(tool)
    return table


RENAMES = _renames()


def names_elsewhere(key: str) -> dict[str, list[str]]:
    """The names of one lmtune setting in each other tool (its own name included when shared)."""
    names = (field_info(key).json_schema_extra or {}).get("names", {})
    return {TOOL_LABEL[tool]: list(names.get(tool, [])) for tool in TOOLS if names.get(tool)}


# Values other tools write for lmtune's choices.
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "optimizer": {
        "adamw": "adamw_torch",
        "adamw_hf": "adamw_torch",
        "adamw_bnb_8bit": "adamw_8bit",
        "paged_adamw_8bit": "adamw_8bit",
        "adamw_8bit": "adamw_8bit",
        "adamw_torch_fused": "adamw_torch_fused",
        "paged_adamw_32bit": "adamw_torch",
    },
    "precision": {"float32": "fp32", "no": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"},
    "attn_implementation": {"fa2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager", "disabled": "eager"},
    "lr_scheduler": {"constant_schedule": "constant", "cosine_schedule": "cosine"},
    "eval_strategy": {"none": "no"},
}

# The template names LLaMA-Factory, Axolotl and model cards write, as lmtune's format names.
VALUE_ALIASES["template"] = {written: meant for written, meant in TEMPLATE_NAMES.items() if written != meant}

# Notes for value rewrites that change more than the spelling.
# TRL writes scale_rewards as "group", "batch" or "none" too.
VALUE_ALIASES["scale_rewards"] = {"group": True, "none": False, "batch": True}  # type: ignore[dict-item]

VALUE_NOTES = {
    ("scale_rewards", "batch"): "scaling by the whole batch's spread is not built in; each group's spread divides its advantages",
    ("optimizer", "paged_adamw_32bit"): "paging optimizer states to CPU is a CUDA memory feature; "
    "lmtune runs plain AdamW with fp32 states",
    ("optimizer", "paged_adamw_8bit"): "lmtune runs bitsandbytes 8-bit AdamW without paging",
}


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on", "auto")
    return bool(value)


def _precision(name: str) -> Callable[[Any], dict[str, Any]]:
    def translate(value: Any) -> dict[str, Any]:
        return {"precision": name} if _truthy(value) else {}

    return translate


def _adapter(value: Any) -> dict[str, Any]:
    text = str(value).strip().lower() if value is not None else ""
    if text in ("", "none", "null", "false"):
        return {"method": "full"}
    if text in ("lora", "qlora"):
        return {"method": text}
    raise AliasError(f"adapter: {value!r} is not one lmtune trains; use lora or qlora, or leave it empty for full")


def _quantization_bit(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    bits = int(value)
    if bits == 4:
        return {"method": "qlora"}
    if bits == 8:
        return {"int8_quantization": True}
    raise AliasError(f"quantization_bit: {bits} is not supported; lmtune quantises bases to 4 (qlora) or 8 bits")


def _rl(value: Any) -> dict[str, Any]:
    text = str(value).strip().lower() if value is not None else ""
    if text in ("", "none", "false"):
        return {}
    if text in ("dpo", "kto", "grpo"):
        return {"stage": text}
    if text in ("ipo", "orpo", "simpo"):
        return {"stage": "dpo", "pref_loss": text}
    raise AliasError(
        f"rl: {value!r} is not a stage lmtune has; it trains dpo (and ipo, orpo, simpo as pref_loss), kto, grpo, rm and ppo"
    )


SWIFT_REWARDS = {"accuracy": "exact_match", "format": "format"}  # ms-swift's built-in reward names that lmtune has


def _reward_funcs(value: Any) -> dict[str, Any]:
    """TRL / Axolotl `reward_funcs` (import paths `module.function`) and ms-swift's built-in names, as reward_function."""
    entries = [value] if isinstance(value, str) else list(value or [])
    out = []
    for entry in map(str, entries):
        if entry in SWIFT_REWARDS or entry in ("exact_match", "format") or ":" in entry:
            out.append(SWIFT_REWARDS.get(entry, entry))
        elif "." in entry:  # rewards.accuracy -> rewards.py:accuracy, read from the config's folder
            module, _, function = entry.rpartition(".")
            out.append(module.replace(".", "/") + ".py:" + function)
        else:
            raise AliasError(f"reward_funcs: {entry!r} is neither module.function nor a built-in reward (exact_match, format)")
    return {"reward_function": out} if out else {}


def _scale_rewards(value: Any) -> dict[str, Any]:
    """TRL's scale_rewards: true/false, or "group" / "batch" / "none" (batch scaling is not built in)."""
    text = str(value).strip().lower()
    if text in ("none", "false", "0"):
        return {"scale_rewards": False}
    if text in ("group", "true", "1"):
        return {"scale_rewards": True}
    return {"scale_rewards": True, WARNING: f"scale_rewards: {value} runs as group: each group's spread divides its advantages"}


VLLM_NOT_NEEDED = ("lmtune samples in the training process with its own KV-cache sampler (each prompt computed once for "
                   "its group); no vLLM server or colocated engine is needed")

# The keys of Axolotl's `trl:` block (TRL's GRPOConfig names): trl key -> (lmtune key, value translation).
TRL_GRPO = {
    "beta": "beta", "num_generations": "num_generations", "max_completion_length": "max_new_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "epsilon": "epsilon", "epsilon_high": "epsilon_high",
    "loss_type": "grpo_loss", "num_iterations": "num_iterations", "importance_sampling_level": "importance_sampling_level",
    "mask_truncated_completions": "mask_truncated_completions", "reward_weights": "reward_weights",
}


def _trl_block(value: Any) -> dict[str, Any]:
    """Axolotl's `trl:` block: the GRPO settings it holds, under lmtune's names."""
    if not isinstance(value, dict):
        raise AliasError("trl: expected a block of TRL settings (beta, num_generations, reward_funcs, ...)")
    out: dict[str, Any] = {}
    notes = []
    for key, item in value.items():
        if key in TRL_GRPO:
            out[TRL_GRPO[key]] = item
        elif key == "reward_funcs":
            out.update(_reward_funcs(item))
        elif key == "scale_rewards":
            translated = _scale_rewards(item)
            notes += [translated.pop(WARNING)] if WARNING in translated else []
            out.update(translated)
        elif key == "use_vllm" or key.startswith("vllm"):
            if key == "use_vllm" and _truthy(item):
                notes.append(f"trl.use_vllm: not needed: {VLLM_NOT_NEEDED}")
        else:
            notes.append(f"trl.{key}: no lmtune setting has this meaning; left out")
    if notes:
        out[WARNING] = "; ".join(notes)
    return out


def _rlhf_type(value: Any) -> dict[str, Any]:
    """ms-swift's --rlhf_type."""
    text = str(value).strip().lower()
    if text in ("dpo", "kto", "grpo", "ppo", "rm"):
        return {"stage": text}
    if text in ("orpo", "simpo"):
        return {"stage": "dpo", "pref_loss": text}
    raise AliasError(f"rlhf_type: {value!r} is not a stage lmtune has; it trains dpo, orpo, simpo, kto, grpo, ppo and rm")


def _lora_target_linear(value: Any) -> dict[str, Any]:
    return {"lora_target": ["all"]} if _truthy(value) else {}


def _flash_attention(value: Any) -> dict[str, Any]:
    return {"attn_implementation": "flash_attention_2"} if _truthy(value) else {}


def _sdp_attention(value: Any) -> dict[str, Any]:
    return {"attn_implementation": "sdpa"} if _truthy(value) else {}


def _val_set_size(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    size = float(value)
    if size >= 1:
        raise AliasError(
            f"val_set_size: {value} is a row count; lmtune takes a fraction in "
            "validation_split_ratio (e.g. 0.05) and caps rows with max_val_samples"
        )
    return {"validation_split_ratio": size}


def _fsdp(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    options = value if isinstance(value, list) else str(value).split()
    out: dict[str, Any] = {"enable_fsdp": True}
    for option in options:
        if option in ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard"):
            out["fsdp_sharding_strategy"] = option
        if option == "offload":
            out["fsdp_offload_params"] = True
    return out


def _fsdp_config(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise AliasError("fsdp_config: expected a mapping of fsdp_* settings")
    out: dict[str, Any] = {}
    if "fsdp_offload_params" in value:
        out["fsdp_offload_params"] = _truthy(value["fsdp_offload_params"])
    strategy = value.get("fsdp_sharding_strategy")
    if strategy:
        out["fsdp_sharding_strategy"] = str(strategy).lower()
    return out


def _mixed_precision(value: Any) -> dict[str, Any]:
    text = str(value).strip().lower() if value is not None else ""
    return {"precision": VALUE_ALIASES["precision"].get(text, text)} if text else {}


AXOLOTL_TYPES = {
    "alpaca": "instruction",
    "alpaca_chat": "instruction",
    "completion": "text",
    "pretrain": "text",
    "chat_template": "chat",
    "sharegpt": "chat",
}
AXOLOTL_COLUMN_FIELDS = {
    "field_messages": "messages",
    "field_chosen": "chosen",
    "field_rejected": "rejected",
    "field_instruction": "instruction",
    "field_input": "input",
    "field_output": "output",
    "field_system": "system",
    "field": "text",
}


def _axolotl_dataset(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    path = entry.get("path")
    if not path:
        raise AliasError("datasets: an entry has no path; each needs `path:`")
    kind = str(entry.get("type") or "auto").split(".")[0]
    columns = {ours: str(entry[theirs]) for theirs, ours in AXOLOTL_COLUMN_FIELDS.items() if entry.get(theirs)}
    formats = ("auto", "text", "instruction", "chat", "preference", "prompt", "unpaired")
    fmt = AXOLOTL_TYPES.get(kind, kind)
    spec: dict[str, Any] = {"path": path, "format": fmt if fmt in formats else "auto"}
    if columns:
        spec["columns"] = columns
    if entry.get("split"):
        spec["split"] = entry["split"]
    return spec


def _datasets(value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    entries = value if isinstance(value, list) else [value]
    out: dict[str, Any] = {"dataset": [_axolotl_dataset(entry) for entry in entries]}
    # A `type` that names a prompt or transform function (`rewards.gsm8k_transform`, `chatml.intel`) is Axolotl code.
    transforms = [str(e["type"]) for e in entries if isinstance(e, dict) and e.get("type") and _axolotl_dataset(e)["format"] == "auto"]
    if transforms:
        out[WARNING] = (f"type {', '.join(transforms)}: Axolotl's transform functions are not run; lmtune reads the rows' "
                        "columns (prompt, messages, chosen/rejected, ...): rename yours with dataset_columns")
    return out


def _test_datasets(value: Any) -> dict[str, Any]:
    converted = _datasets(value)
    return {"validation_dataset": converted["dataset"]} if converted else {}


def _special_tokens(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise AliasError("special_tokens: expected a mapping such as {pad_token: ...}")
    changed = sorted(set(value) - {"pad_token"})
    if changed:
        raise AliasError(
            f"special_tokens: changing {', '.join(changed)} is not supported yet; use a tokenizer that has them"
        )
    return {WARNING: "pad_token ignored: lmtune pads with the tokenizer's pad token (or its end token) and never trains on padding"}


# A translation may return this key with a message instead of (or beside) settings.
WARNING = "_warning"

# foreign key -> translation into lmtune settings
TRANSLATIONS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "bf16": _precision("bf16"),
    "fp16": _precision("fp16"),
    "fp32": _precision("fp32"),
    "mixed_precision": _mixed_precision,
    "adapter": _adapter,
    "load_in_4bit": lambda v: {"method": "qlora"} if _truthy(v) else {},
    "quantization_bit": _quantization_bit,
    "rl": _rl,
    "trl": _trl_block,
    "reward_funcs": _reward_funcs,
    "rlhf_type": _rlhf_type,
    "lora_target_linear": _lora_target_linear,
    "flash_attention": _flash_attention,
    "sdp_attention": _sdp_attention,
    "val_set_size": _val_set_size,
    "fsdp": _fsdp,
    "fsdp_config": _fsdp_config,
    "datasets": _datasets,
    "test_datasets": _test_datasets,
    "special_tokens": _special_tokens,
}
TRANSLATION_TOOL = {
    "bf16": "axolotl",
    "fp16": "axolotl",
    "fp32": "axolotl",
    "mixed_precision": "accelerate",
    "adapter": "axolotl",
    "load_in_4bit": "axolotl",
    "quantization_bit": "llamafactory",
    "rl": "axolotl",
    "trl": "axolotl",
    "reward_funcs": "trl",
    "rlhf_type": "swift",
    "lora_target_linear": "axolotl",
    "flash_attention": "axolotl",
    "sdp_attention": "axolotl",
    "val_set_size": "axolotl",
    "fsdp": "axolotl",
    "fsdp_config": "axolotl",
    "datasets": "axolotl",
    "test_datasets": "axolotl",
    "special_tokens": "axolotl",
}

# Keys with no effect on what lmtune trains: accepted, reported once.
IGNORED: dict[str, str] = {
    "model_type": "lmtune reads the architecture from the model's own config",
    "tokenizer_type": "lmtune loads tokenizers with AutoTokenizer",
    "do_train": "`lmtune train` always trains",
    "do_eval": "evaluation follows eval_strategy",
    "strict": "lmtune always validates every key",
    "save_safetensors": "lmtune always saves safetensors",
    "logging_dir": "logs go into output_dir",
    "wandb_watch": "gradient histograms are not sent to wandb; metrics, config and the final model's path are",
    "wandb_log_model": "the model is not uploaded to wandb; its path is recorded in the run's summary",
    "lora_model_dir": "resume an adapter run with resume_from_checkpoint",
    "lora_fan_in_fan_out": "lmtune reads the layer layout from the model",
    "xformers_attention": "lmtune picks SDPA or flash attention (attn_implementation)",
    "local_rank": "the launcher sets each process's rank",
    "debug": "use sagemaker_container_log_level or --verbose",
    "eval_table_size": "generation tables during eval are not built in",
    "saves_per_epoch": "lmtune saves at each epoch's end unless save_steps is set",
    "eval_sample_packing": "evaluation batches are never packed",
    "pad_to_sequence_len": "lmtune pads each batch only to its longest example (or packs)",
    "quantization_method": "lmtune quantises with bitsandbytes",
    "include_mfu": "lmtune's benchmarks report model FLOPs utilisation",
    "dataloader_num_workers": "tokenised batches are read in the main process",
    "dataloader_prefetch_factor": "tokenised batches are read in the main process",
    "dataloader_persistent_workers": "tokenised batches are read in the main process",
    "dataloader_pin_memory": "lmtune decides pinning from the device",
    "save_only_model": "checkpoints always hold what --resume needs",
    "torch_compile_backend": "torch_compile uses the default inductor backend",
    "mask_history": "every assistant turn is trained unless train_on_inputs is set",
    "pure_bf16": "bf16 runs keep fp32 master weights",
    "device": "lmtune picks the device (CUDA when present)",
    "shuffle": "training batches are always shuffled with the seed",
    "log_peak_memory_stats": "peak memory is always logged",
    "save_adapter_weights_only": "LoRA runs save the adapter in PEFT format",
    "enable_activation_offloading": "not built in; use gradient_checkpointing",
    "apply_lora_to_mlp": "use lora_target",
    "apply_lora_to_output": "use lora_target",
    "skip_prepare_dataset": "lmtune always tokenises the data once, into its cache, before training",
    "vllm": VLLM_NOT_NEEDED,
    "use_vllm": VLLM_NOT_NEEDED,
    "vllm_mode": VLLM_NOT_NEEDED,
    "vllm_server_host": VLLM_NOT_NEEDED,
    "vllm_server_port": VLLM_NOT_NEEDED,
    "vllm_gpu_memory_utilization": VLLM_NOT_NEEDED,
}

# Features other tools have and lmtune does not, each with what to use instead. Setting one is an error (a run
# would silently train without it); an empty or false value is accepted silently: it asks for nothing.
LACKS = "lmtune does not have "
UNSUPPORTED: dict[str, str] = {
    "deepspeed": LACKS + "DeepSpeed; set enable_fsdp: true to shard weights, gradients and optimizer state across GPUs",
    "tokens": LACKS + "adding tokens to a tokenizer yet; use a tokenizer that has them",
    "enable_liger_kernel": LACKS + "Liger kernels; remove the key (lmtune's chunked loss and fused norms are on by default)",
    "use_liger_kernel": LACKS + "Liger kernels; remove the key (lmtune's chunked loss and fused norms are on by default)",
    "liger_rope": LACKS + "Liger kernels; remove the key",
    "attn": LACKS + "this key; use attn_implementation (eager, sdpa, flash_attention_2)",
    "report_to_wandb": LACKS + "this key; write report_to: wandb",
    "push_to_hub": LACKS + "uploading; push the run's final/ folder yourself (huggingface-cli upload)",
    "hub_model_id": LACKS + "uploading; push the run's final/ folder yourself (huggingface-cli upload)",
    "use_unsloth": LACKS + "Unsloth's kernels; remove the key (lmtune's own packed attention and chunked loss are on)",
    "unsloth_lora_mlp": LACKS + "Unsloth's kernels; remove the key",
    "unsloth_lora_qkv": LACKS + "Unsloth's kernels; remove the key",
    "unsloth_lora_o": LACKS + "Unsloth's kernels; remove the key",
    "unsloth_cross_entropy_loss": LACKS + "Unsloth's kernels; remove the key (lmtune's loss is chunked already)",
    "unsloth_rms_norm": LACKS + "Unsloth's kernels; remove the key",
    "unsloth_rope": LACKS + "Unsloth's kernels; remove the key",
    "gptq": LACKS + "GPTQ bases; use method: qlora or int8_quantization",
    "relora_steps": LACKS + "ReLoRA; use method: lora",
    "use_dora": LACKS + "DoRA; use method: lora (raise lora_r for more capacity)",
    "peft_use_dora": LACKS + "DoRA; use method: lora (raise lora_r for more capacity)",
    "use_rslora": LACKS + "rank-stabilised LoRA; use method: lora and scale lora_alpha with lora_r",
    "peft_use_rslora": LACKS + "rank-stabilised LoRA; use method: lora and scale lora_alpha with lora_r",
    "pissa_init": LACKS + "PiSSA initialisation; use method: lora",
    "loraplus_lr_ratio": LACKS + "LoRA+; use method: lora with one learning_rate",
    "use_galore": LACKS + "GaLore; use method: lora or qlora to cut optimizer memory",
    "use_badam": LACKS + "BAdam; use method: freeze (freeze_trainable_layers) or lora",
    "use_apollo": LACKS + "APOLLO; use method: lora or qlora to cut optimizer memory",
    "use_adam_mini": LACKS + "Adam-mini; use optimizer: adamw_8bit (quant extra) to cut optimizer memory",
    "use_muon": LACKS + "the Muon optimizer; use optimizer: adamw",
    "use_llama_pro": LACKS + "LLaMA Pro block expansion; use method: freeze (freeze_trainable_layers)",
    "use_lisa": LACKS + "LISA; use method: freeze (freeze_trainable_layers) or lora",
    "lisa_n_layers": LACKS + "LISA; use method: freeze (freeze_trainable_layers) or lora",
    "neftune_noise_alpha": LACKS + "NEFTune embedding noise; remove the key",
    "noisy_embedding_alpha": LACKS + "NEFTune embedding noise; remove the key",
    "shift_attn": LACKS + "shifted sparse attention (LongLoRA); use gradient_checkpointing for long rows",
    "s2_attention": LACKS + "shifted sparse attention (LongLoRA); use gradient_checkpointing for long rows",
    "rope_scaling": LACKS + "RoPE scaling at training time yet; use a model whose config.json sets the context you need",
    "mixture_of_depths": LACKS + "mixture-of-depths conversion; remove the key",
    "lora_on_cpu": LACKS + "CPU-placed LoRA weights; remove the key",
    "multipack_real_batches": LACKS + "this key; pack_to_length: true fills rows of max_input_length tokens",
    "freeze_vision_tower": LACKS + "vision-language training; lmtune trains text-only causal language models",
    "train_mm_proj_only": LACKS + "vision-language training; lmtune trains text-only causal language models",
    "image_max_pixels": LACKS + "vision-language training; lmtune trains text-only causal language models",
    "model": LACKS + "torchtune's component blocks; name the model with base_model",
    "tokenizer_component": LACKS + "torchtune's component blocks; name the tokenizer with tokenizer",
    "checkpointer": LACKS + "torchtune's component blocks; name the model with base_model",
    "loss": LACKS + "torchtune's component blocks; set pref_beta / pref_loss for dpo",
    "metric_logger": LACKS + "torchtune's component blocks; metrics go to metrics.jsonl",
}


def every_known_name() -> list[str]:
    return sorted(set(KEY_GROUP) | set(RENAMES) | set(TRANSLATIONS) | set(IGNORED) | set(UNSUPPORTED))
