"""Rules across settings, checked before any model or data is loaded.

Each rule looks at the validated config (and which keys the user set) and
returns problems that name the key(s) and the fix. Nothing here imports torch:
whether CUDA or bitsandbytes exist is read from the system, not by loading them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .problem import Problem
from .schema import KEY_GROUP as KEY_ORDER
from .method import trains_adapters
from ..data.templates import ALL_TEMPLATES, TEMPLATE_NAMES

if TYPE_CHECKING:
    from .load import Resolved

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")

LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target", "lora_modules_to_save")
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")
ADAM_KEYS = ("adam_beta1", "adam_beta2", "adam_epsilon")


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is reachable, without importing torch."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


Rule = Callable[["Resolved"], list[Problem]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def _set_keys(r: "Resolved", keys: tuple[str, ...]) -> list[str]:
    return [r.sources[k].name for k in keys if r.was_set(k)]


@rule
def quantisation_needs_adapters(r: "Resolved") -> list[Problem]:
    c = r.config.finetuning
    out = []
    if c.int8_quantization and c.method in ("full", "freeze"):
        out.append(
            Problem(
                "error",
                "int8_quantization",
                f"an 8-bit base cannot be trained with method: {c.method}; "
                "set method: lora (adapters over the 8-bit base) or int8_quantization: false",
            )
        )
    if c.int8_quantization and c.method == "qlora":
        out.append(
            Problem(
                "error",
                "int8_quantization",
                "method: qlora already loads the base in 4 bits; drop int8_quantization or use method: lora",
            )
        )
    if (c.int8_quantization or c.method == "qlora") and not installed("bitsandbytes"):
        out.append(
            Problem(
                "error",
                "method" if c.method == "qlora" else "int8_quantization",
                "quantised bases need bitsandbytes; install it with `pip install 'lmtune[quant]'`",
                machine=True,
            )
        )
    return out


@rule
def settings_the_method_ignores(r: "Resolved") -> list[Problem]:
    method = r.config.finetuning.method
    out = []
    lora = _set_keys(r, LORA_KEYS)
    if lora and not trains_adapters(method):
        out.append(
            Problem("warning", ", ".join(lora), f"ignored with method: {method}; they apply to lora and qlora")
        )
    freeze = _set_keys(r, FREEZE_KEYS)
    if freeze and method != "freeze":
        out.append(Problem("warning", ", ".join(freeze), f"ignored with method: {method}; they apply to freeze"))
    quant4 = _set_keys(r, ("bnb_4bit_quant_type", "bnb_4bit_double_quant"))
    if quant4 and method != "qlora":
        out.append(Problem("warning", ", ".join(quant4), f"ignored with method: {method}; they apply to qlora"))
    return out


def _has_validation_data(r: "Resolved") -> bool:
    d = r.config.data
    return bool(d.validation_dataset) or d.validation_split_ratio > 0


@rule
def evaluation_needs_data(r: "Resolved") -> list[Problem]:
    t, e = r.config.training, r.config.evaluation
    out = []
    evaluates = _has_validation_data(r) and e.eval_strategy != "no"
    if t.early_stopping_patience is not None and not evaluates:
        why = "eval_strategy is no" if e.eval_strategy == "no" else "there is no validation data"
        out.append(
            Problem(
                "error",
                "early_stopping_patience",
                f"early stopping needs evaluations, but {why}; set validation_split_ratio (e.g. 0.1) "
                "or validation_dataset, and an eval_strategy other than no",
            )
        )
    if e.eval_strategy == "steps" and e.eval_steps is None and e.evals_per_epoch is None:
        out.append(Problem("error", "eval_strategy", "eval_strategy: steps needs eval_steps (e.g. 100)"))
    if e.eval_strategy in ("steps", "epoch") and not _has_validation_data(r):
        out.append(
            Problem(
                "error",
                "eval_strategy",
                f"eval_strategy: {e.eval_strategy} but there is no validation data; "
                "set validation_split_ratio or validation_dataset",
            )
        )
    if e.eval_steps is not None and e.evals_per_epoch is not None:
        out.append(Problem("error", "eval_steps", "eval_steps and evals_per_epoch both set; keep one"))
    if r.config.data.validation_dataset and r.config.data.validation_split_ratio > 0:
        out.append(
            Problem("warning", "validation_split_ratio", "ignored: validation_dataset is given, so nothing is split off")
        )
    if r.was_set("max_val_samples") and not _has_validation_data(r):
        out.append(Problem("warning", "max_val_samples", "ignored: there is no validation data"))
    return out


@rule
def learning_rate_is_positive(r: "Resolved") -> list[Problem]:
    lr = r.config.training.learning_rate
    if lr <= 0:
        return [Problem("error", "learning_rate", f"must be above 0, got {lr}; typical: 2e-4 for LoRA, 2e-5 for full")]
    if lr >= 1:
        return [Problem("warning", "learning_rate", f"{lr} is far above any fine-tuning rate; the loss will diverge")]
    return []


@rule
def run_length(r: "Resolved") -> list[Problem]:
    t = r.config.training
    out = []
    if t.max_steps == 0:
        out.append(Problem("error", "max_steps", "0 steps trains nothing; use -1 to run for epochs, or a positive count"))
    if t.max_steps > 0 and t.warmup_steps > t.max_steps:
        out.append(
            Problem(
                "warning",
                "warmup_steps",
                f"{t.warmup_steps} warmup steps is longer than the run ({t.max_steps} steps): "
                "the learning rate never reaches its peak; lower warmup_steps",
            )
        )
    if t.warmup_steps > 0 and t.warmup_ratio > 0:
        out.append(Problem("note", "warmup_ratio", "warmup_steps is set too, and wins"))
    if t.max_steps > 0 and r.was_set("epochs"):
        out.append(Problem("note", r.sources["epochs"].name, f"max_steps: {t.max_steps} decides the run's length"))
    if r.config.data.max_input_length == 0:
        out.append(Problem("error", "max_input_length", "0 tokens fits nothing; use -1 (the model's length) or e.g. 2048"))
    return out


@rule
def the_stage_rules(r: "Resolved") -> list[Problem]:
    """The stage's own rules, and the settings of other stages that this one ignores."""
    from ..stages import STAGES, stage_of

    stage = stage_of(r.config)
    out = stage.rules(r)
    d = r.config.data
    if d.pack_to_length and not stage.packs_to_length:
        packers = " and ".join(s.name for s in STAGES.values() if s.packs_to_length)
        out.append(Problem("error", "pack_to_length", f"rows packed to a length are for {packers}, not {stage.name}; set pack_to_length: false"))
    elif d.pack_to_length and d.packing is False:
        out.append(Problem("error", "pack_to_length", "rows packed to a length are laid out without padding; remove packing: false, or set pack_to_length: false"))
    elif d.pack_to_length and d.group_by_length:
        out.append(Problem("warning", "group_by_length", "ignored with pack_to_length: rows are filled with examples of mixed lengths"))
    if r.config.training.torch_compile and stage.recipe is not None:
        # their recipes sample answers between steps, where compiled blocks would recompile at every new length
        out.append(Problem("warning", r.sources["torch_compile"].name,
                           f"ignored with stage: {stage.name}, which runs a recipe of its own; set torch_compile: false"))
    mine = set(stage.keys())
    ignored: dict[str, list[str]] = {}  # the stages they apply to -> the keys the user set
    for key in sorted({k for s in STAGES.values() for k in s.keys()} - mine, key=list(KEY_ORDER).index):
        if r.was_set(key):
            owners = " and ".join(s.name for s in STAGES.values() if key in s.keys())
            ignored.setdefault(owners, []).append(r.sources[key].name)
    for owners, keys in ignored.items():
        verb = "they apply" if len(keys) > 1 else "it applies"
        out.append(Problem("warning", ", ".join(keys), f"ignored with stage: {stage.name}; {verb} to {owners}"))
    return out


MIN_CHAT_LENGTH = 16  # below any chat template's frame around one exchange
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@rule
def data_settings(r: "Resolved") -> list[Problem]:
    d = r.config.data
    out = []
    if d.chat_dataset and d.instruction_tuned:
        out.append(
            Problem("error", "chat_dataset", "chat_dataset and instruction_tuned are both true; a dataset is one or the other")
        )
    if d.add_input_output_demarcation_key and d.chat_dataset:
        out.append(
            Problem("warning", "add_input_output_demarcation_key", "ignored for chat data; it marks instruction prompts")
        )
    if d.dataset_weights and len(d.dataset_weights) != len(d.dataset):
        out.append(
            Problem(
                "error",
                "dataset_weights",
                f"{len(d.dataset_weights)} weights for {len(d.dataset)} datasets; give one weight per dataset",
            )
        )
    if any(w <= 0 for w in d.dataset_weights):
        out.append(Problem("error", "dataset_weights", "weights must be above 0"))
    if d.template is not None and d.template.strip().lower() not in TEMPLATE_NAMES:
        out.append(
            Problem(
                "error",
                "template",
                f"no template named {d.template!r}; use one of {', '.join(ALL_TEMPLATES)} (or a name "
                "`lmtune explain template` lists), or leave it unset for the tokenizer's own chat template",
            )
        )
    base = Path(d.dataset_dir) if d.dataset_dir else Path(r.path).parent if r.path else Path(".")
    for key, entries in (("dataset", d.dataset), ("validation_dataset", d.validation_dataset)):
        for entry in entries:
            where = entry if isinstance(entry, str) else entry.path
            looks_local = where.endswith(DATA_SUFFIXES) or where.startswith((".", "/", "~"))
            candidate = Path(where).expanduser()
            if not candidate.is_absolute() and not candidate.exists():
                candidate = base / candidate
            if where.startswith("llamafactory:"):  # written by `lmtune convert` without the dataset_info.json
                out.append(Problem("error", key, f"{where[len('llamafactory:'):]} is a LLaMA-Factory dataset name, not a file "
                                                 "or hub id; run `lmtune convert` again with --dataset-info "
                                                 "PATH/dataset_info.json (LLaMA-Factory's data/dataset_info.json)"))
            elif looks_local and not candidate.exists():
                out.append(Problem("error", key, f"{where}: no such file or folder; check the path"))
            elif not candidate.exists() and not HUB_ID.fullmatch(where):
                out.append(Problem("error", key, f"{where!r} is neither a file or folder here nor a hub dataset id "
                                                 "(`owner/name`); check the value"))
    from ..stages import stage_of

    chat = bool(stage_of(r.config).reads - {"text"})
    if chat and 0 < d.max_input_length < MIN_CHAT_LENGTH and d.truncation != "drop":
        out.append(Problem("error", "max_input_length", f"{d.max_input_length} tokens leave no room for the data: chat "
                           f"templates alone take 10 to 40 tokens around each exchange, so prompts would be cut away; "
                           "use at least 64 (rows are usually hundreds of tokens)"))
    out += _streaming(r)
    if d.max_train_samples == 0:
        out.append(Problem("error", "max_train_samples", "0 leaves nothing to train on; use -1 for every row, or a count above 0"))
    if d.max_val_samples == 0:
        out.append(Problem("error", "max_val_samples", "0 leaves nothing to evaluate; use -1 for every row, or a count above 0"))
    if not d.dataset and not (d.chat_dataset or d.instruction_tuned):
        out.append(Problem("note", "dataset", "no dataset given; `lmtune train` needs one (or a SageMaker train channel)"))
    return out


def _streaming(r: "Resolved") -> list[Problem]:
    """What a stream cannot give: its length, every example's length up front, random access."""
    from ..stages import stage_of

    d, t, stage = r.config.data, r.config.training, stage_of(r.config)
    if not d.streaming:
        return []
    out = []
    if t.max_steps <= 0:
        out.append(Problem("error", "streaming", "a stream's length is not known up front, so epochs cannot be counted; "
                                                 "set max_steps (the run's length in optimizer steps)"))
    if not stage.streams:
        out.append(Problem("error", "streaming", f"stage {stage.name} reads its rows whole (not one micro batch at a "
                                                 "time in stream order); set streaming: false"))
    for key, why in (("pack_to_length", "fills rows from every example's length"),
                     ("group_by_length", "sorts by every example's length"),
                     ("precompute_ref_logps", "scores every row before training")):
        if getattr(d, key, None) or getattr(t, key, None) or getattr(r.config.finetuning, key, None):
            out.append(Problem("error", key, f"{why} up front, which a stream does not have; set {key}: false "
                                             "or streaming: false"))
    if d.validation_split_ratio > 0:
        out.append(Problem("error", "validation_split_ratio", "a stream has no known length to take a share of; with "
                           "streaming the stream's first max_val_samples rows validate: set max_val_samples (e.g. 500) "
                           "and validation_split_ratio: 0"))
    return out


@rule
def optimizer_settings(r: "Resolved") -> list[Problem]:
    t = r.config.training
    out = []
    if t.nesterov and t.momentum == 0:
        out.append(Problem("error", "nesterov", "Nesterov momentum needs momentum above 0 (e.g. momentum: 0.9)"))
    if t.nesterov and t.optimizer != "sgd":
        out.append(Problem("warning", "nesterov", f"ignored with optimizer: {t.optimizer}; it applies to sgd"))
    if r.was_set("momentum") and t.optimizer not in ("sgd", "rmsprop"):
        out.append(Problem("warning", "momentum", f"ignored with optimizer: {t.optimizer}; it applies to sgd and rmsprop"))
    adam = _set_keys(r, ADAM_KEYS)
    if adam and t.optimizer in ("sgd", "rmsprop"):
        out.append(Problem("warning", ", ".join(adam), f"ignored with optimizer: {t.optimizer}; they apply to Adam"))
    if t.optimizer == "adamw_8bit" and not installed("bitsandbytes"):
        out.append(
            Problem("error", "optimizer", "adamw_8bit needs bitsandbytes; `pip install 'lmtune[quant]'` or use adamw_torch",
                    machine=True)
        )
    if t.optimizer == "adamw_torch_fused" and not cuda_visible():
        out.append(Problem("note", "optimizer", "no CUDA device here; the fused AdamW runs its CPU kernel"))
    if r.was_set("lr_cycles") and t.lr_scheduler != "cosine_with_restarts":
        out.append(Problem("warning", "lr_cycles", f"ignored with lr_scheduler: {t.lr_scheduler}"))
    if r.was_set("lr_power") and t.lr_scheduler != "polynomial":
        out.append(Problem("warning", "lr_power", f"ignored with lr_scheduler: {t.lr_scheduler}"))
    if t.min_lr_ratio > 0 and t.lr_scheduler in ("constant", "constant_with_warmup"):
        out.append(Problem("warning", "min_lr_ratio", f"ignored: lr_scheduler {t.lr_scheduler} does not decay"))
    return out


@rule
def precision_settings(r: "Resolved") -> list[Problem]:
    p = r.config.precision
    out = []
    if p.tf32 and not cuda_visible():
        out.append(
            Problem("note", "tf32", "TF32 is a CUDA matmul mode and no CUDA device is visible here; it has no effect on CPU")
        )
    if p.precision == "fp16" and not cuda_visible():
        out.append(
            Problem("note", "precision", "fp16 on CPU is slow and needs loss scaling; bf16 is the better CPU choice")
        )
    return out


@rule
def outputs_and_safety(r: "Resolved") -> list[Problem]:
    m, o, s = r.config.model, r.config.output, r.config.sagemaker
    out = []
    if m.trust_remote_code:
        out.append(
            Problem("note", "trust_remote_code", "the model's own Python code will run while loading; use only trusted models")
        )
    resume = o.resume_from_checkpoint
    if resume and resume != "latest" and not Path(resume).exists():
        out.append(Problem("error", "resume_from_checkpoint", f"{resume}: no such checkpoint; give a folder or `latest`"))
    level = s.sagemaker_container_log_level
    if level is not None and not 0 <= level <= 50:
        out.append(
            Problem("error", "sagemaker_container_log_level", f"{level} is not a logging level; use 10, 20, 30, 40 or 50")
        )
    if r.config.distributed.fsdp_offload_params and not r.config.distributed.enable_fsdp:
        out.append(Problem("warning", "fsdp_offload_params", "ignored: enable_fsdp is false"))
    f = r.config.finetuning
    if r.config.distributed.enable_fsdp and (f.method == "qlora" or f.int8_quantization):
        out.append(Problem("error", "enable_fsdp", "bitsandbytes' quantised weights are not sharded by FSDP2 in this version; "
                           "use method: lora on a bf16 base with enable_fsdp, or keep the quantised base with enable_fsdp: false "
                           "(several processes then train data parallel)"))
    out += _trackers(r)
    return out


@rule
def model_folder_and_kernels(r: "Resolved") -> list[Problem]:
    """What loading would refuse, found here: a kernel this machine lacks, pickle-only weights, a model's own code."""
    m = r.config.model
    out = []
    if m.attn_implementation == "flash_attention_2" and not (cuda_visible() and installed("flash_attn")):
        # A warning: configs written for a GPU cluster are checked on laptops; training here would refuse it.
        missing = "no CUDA GPU is visible" if not cuda_visible() else "the flash-attn package is not installed"
        out.append(Problem("warning", "attn_implementation", f"flash_attention_2 needs a CUDA GPU and flash-attn, and {missing} "
                           "here, so training on this machine refuses it; leave attn_implementation unset for SDPA"))
    folder = Path(m.base_model).expanduser() if m.base_model and not m.base_model.startswith("builtin:") else None
    if folder is not None and not folder.is_absolute() and r.path:
        folder = folder if folder.exists() else Path(r.path).resolve().parent / folder
    if folder is None or not folder.is_dir():
        return out
    pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled and not any(folder.glob("*.safetensors")) and not m.allow_pickle_weights:
        out.append(Problem("error", "base_model", f"{m.base_model} holds only pickle weights ({pickled[0]}), which can run code "
                           "when loaded; convert them to safetensors, or set allow_pickle_weights: true for files you trust"))
    config_file = folder / "config.json"
    if config_file.exists() and not m.trust_remote_code:
        import json

        try:
            auto_map = json.loads(config_file.read_text()).get("auto_map")
        except (ValueError, UnicodeDecodeError):
            auto_map = None
        if auto_map:
            out.append(Problem("error", "base_model", f"{m.base_model} ships its own model code (auto_map in config.json); "
                               "set trust_remote_code: true only if you trust it, or use a model transformers has built in"))
    return out


def _trackers(r: "Resolved") -> list[Problem]:
    """A tracker the run would report to whose package is missing: found here, before any model loads."""
    import importlib.util

    o = r.config.output
    out = []
    for tracker, module, key in (("wandb", "wandb", "wandb_project"), ("mlflow", "mlflow", "mlflow_tracking_uri")):
        if tracker in o.report_to or getattr(o, key):
            if importlib.util.find_spec(module) is None:
                named = "report_to" if tracker in o.report_to else key
                out.append(Problem("error", named, f"{tracker} is not installed; pip install 'lmtune[{tracker}]'", machine=True))
    if "tensorboard" in o.report_to and importlib.util.find_spec("tensorboard") is None:
        out.append(Problem("warning", "report_to", "tensorboard is not installed, so this run writes metrics.jsonl only; "
                           "pip install 'lmtune[tensorboard]'"))
    if "none" in o.report_to and len(o.report_to) > 1:
        out.append(Problem("warning", "report_to", "none is listed with other trackers; the others are used"))
    return out


def check_rules(resolved: "Resolved") -> list[Problem]:
    problems: list[Problem] = []
    for fn in RULES:
        problems += fn(resolved)
    return problems
