"""`lmtune convert`: another tool's config as a commented lmtune config, every key accounted for.

Each key of the source file ends up in one of four places, and the summary
says which: mapped (the same setting under lmtune's name), changed (a value
translated because its meaning differs: a fractional `warmup_steps`, `bf16:
auto`, a torchtune component, a dataset name), ignored (no effect on what
lmtune trains, with why) or unsupported (with why). Nothing is dropped
silently. The translation tables are the ones `lmtune check` reads foreign
keys with (config/aliases.py); this module adds what only a whole file
shows: which tool wrote it, torchtune's component blocks, and LLaMA-Factory's
dataset names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import aliases
from .config.aliases import _truthy
from .config.load import coerce_string
from .config.schema import KEY_GROUP
from .errors import UserError

SOURCES = ("axolotl", "llamafactory", "torchtune", "jumpstart")


class ConvertError(UserError, ValueError):
    """A file that cannot be converted; the message says why."""


@dataclass
class Entry:
    """What became of one key of the source file."""

    source_key: str
    value: Any
    kind: str  # mapped, changed, ignored, unsupported
    settings: dict[str, Any] = field(default_factory=dict)
    why: str = ""


@dataclass
class Conversion:
    source: str
    settings: dict[str, Any]
    entries: list[Entry]

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]


# -- which tool wrote it -------------------------------------------------------------------------

MARKERS = {
    "llamafactory": {"model_name_or_path", "finetuning_type", "cutoff_len", "per_device_train_batch_size", "lora_rank", "pref_beta"},
    "axolotl": {"base_model", "datasets", "sequence_len", "micro_batch_size", "adapter", "num_epochs", "lora_r"},
    "torchtune": {"checkpointer", "batch_size", "max_steps_per_epoch", "enable_activation_checkpointing", "dtype"},
    "jumpstart": {"instruction_tuned", "chat_dataset", "epoch", "per_device_train_batch_size", "enable_fsdp", "int8_quantization"},
}


def detect(raw: dict[str, Any]) -> str:
    if any(isinstance(v, dict) and "_component_" in v for v in raw.values()):
        return "torchtune"
    if raw and all(isinstance(v, str) for v in raw.values()) and raw.keys() & {"instruction_tuned", "chat_dataset", "epoch"}:
        return "jumpstart"
    scores = {tool: len(raw.keys() & keys) for tool, keys in MARKERS.items()}
    best = max(scores.values())
    winners = [tool for tool, score in scores.items() if score == best]
    if best == 0 or len(winners) > 1:
        raise ConvertError(
            "convert: cannot tell which tool wrote this file "
            + (f"(it reads like {' or '.join(winners)})" if best else "(no key any supported tool uses)")
            + "; name it with --from axolotl|llamafactory|torchtune|jumpstart"
        )
    return winners[0]


# -- torchtune's component blocks ------------------------------------------------------------------

TORCHTUNE_LORA_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
TORCHTUNE_SCHEDULERS = {"get_cosine_schedule_with_warmup": "cosine", "get_linear_schedule_with_warmup": "linear"}
TORCHTUNE_OPTIMIZERS = {"AdamW": "adamw_torch", "Adam": "adam", "SGD": "sgd", "_AdamW8bit": "adamw_8bit", "AdamW8bit": "adamw_8bit"}
TORCHTUNE_LOSSES = {"DPOLoss": ("dpo", "sigmoid"), "RSOLoss": ("dpo", "hinge"), "IPOLoss": ("dpo", "ipo"), "SimPOLoss": ("dpo", "simpo")}
TORCHTUNE_DATASETS = {
    "alpaca_dataset": ("tatsu-lab/alpaca", "instruction"),
    "alpaca_cleaned_dataset": ("yahma/alpaca-cleaned", "instruction"),
    "stack_exchange_paired_dataset": ("lvwerra/stack-exchange-paired", "preference"),
    "slimorca_dataset": ("Open-Orca/SlimOrca-Dedup", "chat"),
    "text_completion_dataset": (None, "text"),
    "instruct_dataset": (None, "instruction"),
    "chat_dataset": (None, "chat"),
    "preference_dataset": (None, "preference"),
}
TORCHTUNE_PLAIN = {  # top-level torchtune keys and the lmtune setting each is
    "batch_size": "micro_batch_size",
    "epochs": "epochs",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "enable_activation_checkpointing": "gradient_checkpointing",
    "compile": "torch_compile",
    "output_dir": "output_dir",
    "seed": "seed",
    "log_every_n_steps": "logging_steps",
    "clip_grad_norm": "max_grad_norm",
}


def _number(value: Any) -> Any:
    """YAML 1.1 reads `5e-4` (no dot) as text; torchtune means a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return coerce_string(value)
    return value


def _component(block: Any) -> str:
    return str(block.get("_component_", "")).rsplit(".", 1)[-1] if isinstance(block, dict) else ""


def _torchtune(raw: dict[str, Any]) -> tuple[list[Entry], dict[str, Any]]:
    """Entries for torchtune's component blocks and its own top-level names; returns what is left."""
    entries: list[Entry] = []
    rest = dict(raw)
    for read in (_torchtune_model, _torchtune_files, _torchtune_optimisation, _torchtune_loss, _torchtune_dataset):
        read(rest, entries)
    for theirs, ours in TORCHTUNE_PLAIN.items():
        if theirs in rest:
            value = rest.pop(theirs)
            if value is None:
                entries.append(Entry(theirs, value, "ignored", {}, "left empty: lmtune's default applies"))
            else:
                entries.append(Entry(theirs, value, "mapped", {ours: value}))
    if "dtype" in rest:
        value = str(rest.pop("dtype"))
        precision = {"bf16": "bf16", "fp32": "fp32", "fp16": "fp16"}.get(value, value)
        entries.append(Entry("dtype", value, "changed", {"precision": precision}, "bf16 runs keep fp32 master weights and compute in bf16"))
    if "max_steps_per_epoch" in rest:
        value = rest.pop("max_steps_per_epoch")
        if value:
            epochs = raw.get("epochs") or 1
            entries.append(Entry("max_steps_per_epoch", value, "changed", {"max_steps": int(value) * int(epochs)},
                                 "lmtune caps the whole run: max_steps = max_steps_per_epoch x epochs"))
    return entries, rest


def _torchtune_model(rest: dict[str, Any], entries: list[Entry]) -> None:
    """The model block: its LoRA settings, or full fine-tuning."""
    model = rest.pop("model", None)
    if isinstance(model, dict):
        name, settings = _component(model), {}
        if name.startswith(("lora_", "qlora_")) or "lora_rank" in model:
            settings["method"] = "qlora" if name.startswith("qlora_") else "lora"
            if "lora_rank" in model:
                settings["lora_r"] = model["lora_rank"]
            if "lora_alpha" in model:
                settings["lora_alpha"] = model["lora_alpha"]
            if "lora_dropout" in model:
                settings["lora_dropout"] = model["lora_dropout"]
            targets = [TORCHTUNE_LORA_MODULES.get(m, m) for m in model.get("lora_attn_modules", [])]
            if model.get("apply_lora_to_mlp"):
                targets.append("mlp")
            if targets:
                settings["lora_target"] = targets
        else:
            settings["method"] = "full"
        why = f"{model.get('_component_')}: the architecture comes from the checkpoint's config.json"
        if model.get("apply_lora_to_output"):
            why += "; apply_lora_to_output has no lmtune equivalent (the output head keeps no adapter)"
        entries.append(Entry("model", model, "changed", settings, why))


def _torchtune_files(rest: dict[str, Any], entries: list[Entry]) -> None:
    """The checkpointer and tokenizer blocks: where the base model is, and the longest example."""
    checkpointer = rest.pop("checkpointer", None)
    if isinstance(checkpointer, dict):
        settings = {"base_model": checkpointer["checkpoint_dir"]} if checkpointer.get("checkpoint_dir") else {}
        entries.append(Entry("checkpointer", checkpointer, "changed", settings,
                             "the Hugging Face checkpoint folder is the base model; its files are found by transformers"))
    tokenizer = rest.pop("tokenizer", None)
    if isinstance(tokenizer, dict):
        settings = {"max_input_length": tokenizer["max_seq_len"]} if tokenizer.get("max_seq_len") else {}
        entries.append(Entry("tokenizer", tokenizer, "changed", settings,
                             "the tokenizer is read from the base model's folder; max_seq_len is the longest example"))


def _torchtune_optimisation(rest: dict[str, Any], entries: list[Entry]) -> None:
    """The optimizer and learning-rate scheduler blocks."""
    optimizer = rest.pop("optimizer", None)
    if isinstance(optimizer, dict):
        name = _component(optimizer)
        settings = {"optimizer": TORCHTUNE_OPTIMIZERS.get(name, "adamw_torch")}
        for theirs, ours in (("lr", "learning_rate"), ("weight_decay", "weight_decay"), ("eps", "adam_epsilon"), ("momentum", "momentum")):
            if theirs in optimizer:
                settings[ours] = _number(optimizer[theirs])
        if isinstance(optimizer.get("betas"), (list, tuple)) and len(optimizer["betas"]) == 2:
            settings["adam_beta1"], settings["adam_beta2"] = optimizer["betas"]
        why = f"{optimizer.get('_component_')}" + ("" if name in TORCHTUNE_OPTIMIZERS else ": not known, AdamW instead")
        entries.append(Entry("optimizer", optimizer, "changed" if name in TORCHTUNE_OPTIMIZERS else "unsupported", settings, why))
    scheduler = rest.pop("lr_scheduler", None)
    if isinstance(scheduler, dict):
        name = _component(scheduler)
        settings = {"lr_scheduler": TORCHTUNE_SCHEDULERS.get(name, "constant")}
        if "num_warmup_steps" in scheduler:
            settings["warmup_steps"] = scheduler["num_warmup_steps"]
        entries.append(Entry("lr_scheduler", scheduler, "changed", settings, str(scheduler.get("_component_"))))


def _torchtune_loss(rest: dict[str, Any], entries: list[Entry]) -> None:
    """The loss block: a preference loss makes the run dpo."""
    loss = rest.pop("loss", None)
    if isinstance(loss, dict):
        name = _component(loss)
        if name in TORCHTUNE_LOSSES:
            stage, kind = TORCHTUNE_LOSSES[name]
            settings = {"stage": stage, "pref_loss": kind}
            if "beta" in loss:
                settings["pref_beta"] = loss["beta"]
            if loss.get("label_smoothing"):
                settings["dpo_label_smoothing"] = loss["label_smoothing"]
            if "gamma" in loss and kind == "simpo":
                settings["simpo_gamma"] = loss["gamma"]
            entries.append(Entry("loss", loss, "changed", settings, f"{loss.get('_component_')} is dpo's {kind} loss"))
        else:
            entries.append(Entry("loss", loss, "changed", {}, f"{loss.get('_component_')}: the stage's own loss (cross-entropy on trained tokens)"))


def _torchtune_dataset(rest: dict[str, Any], entries: list[Entry]) -> None:
    """The dataset block (or list of blocks), read by what its builders load."""
    dataset = rest.pop("dataset", None)
    if isinstance(dataset, (dict, list)):
        blocks = dataset if isinstance(dataset, list) else [dataset]
        specs, formats = [], set()
        for block in blocks:
            name = _component(block)
            known, fmt = TORCHTUNE_DATASETS.get(name, (None, "auto"))
            source = block.get("source") or known
            if not source:
                raise ConvertError(f"dataset: {block.get('_component_')} names no source; add `source:` to the block")
            spec: dict[str, Any] = {"path": source, "format": fmt}
            if block.get("column_map"):
                spec["columns"] = {ours: theirs for ours, theirs in block["column_map"].items()}
            if block.get("split"):
                spec["split"] = block["split"]
            specs.append(spec)
            formats.add(fmt)
            if "packed" in block:
                entries.append(Entry("dataset.packed", block["packed"], "mapped", {"pack_to_length": _truthy(block["packed"])}))
        entries.append(Entry("dataset", dataset, "changed", {"dataset": specs}, "torchtune dataset builders, read by what they load"))


# -- LLaMA-Factory's dataset names ----------------------------------------------------------------------


LLAMAFACTORY_NAME = "llamafactory:"  # a dataset_info.json name written out unresolved; `check` refuses it in one line


def _llamafactory_dataset(names: Any, info_path: Optional[Path]) -> Entry:
    listed = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if info_path is None:
        return Entry("dataset", names, "unsupported", {"dataset": [LLAMAFACTORY_NAME + n for n in listed]},
                     "LLaMA-Factory dataset names, not files: pass --dataset-info PATH/dataset_info.json to resolve them "
                     "to files and columns (`check` refuses them until then)")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConvertError(f"--dataset-info: {info_path} cannot be read ({error})") from None
    specs = []
    for name in listed:
        if name not in info:
            raise ConvertError(f"dataset: {name} is not in {info_path}; add it there or give a file path")
        entry = info[name]
        path = entry.get("file_name")
        path = str(info_path.parent / path) if path else entry.get("hf_hub_url")
        if not path:
            raise ConvertError(f"dataset: {name} in {info_path} has no file_name or hf_hub_url")
        columns = dict(entry.get("columns", {}))
        if entry.get("ranking"):
            fmt = "preference"
        elif "kto_tag" in columns:  # a conversation and a desirable/undesirable tag per row
            fmt = "unpaired"
        elif entry.get("formatting") == "sharegpt" or "messages" in columns:
            fmt = "chat"
        else:
            fmt = "auto"
        spec: dict[str, Any] = {"path": path, "format": fmt}
        # LLaMA-Factory's column names are the roles of lmtune's columns: {role: file column}.
        mapping = {}
        for role, column in columns.items():
            ours = {"prompt": "instruction", "query": "input", "response": "output"}.get(role, role)
            if column != ours:
                mapping[ours] = column
        if mapping:
            spec["columns"] = mapping
        if entry.get("split"):
            spec["split"] = entry["split"]
        specs.append(spec)
    return Entry("dataset", names, "changed", {"dataset": specs}, f"resolved through {info_path.name}")


# -- every other key ------------------------------------------------------------------------------------


def _generic(name: str, value: Any) -> Entry:
    value = coerce_string(value)
    if value is None or value == "":
        return Entry(name, value, "ignored", {}, "left empty: lmtune's default applies")
    if name in KEY_GROUP:
        return Entry(name, value, "mapped", {name: value})
    if name in aliases.TRANSLATIONS:
        try:
            settings = aliases.TRANSLATIONS[name](value)
        except (aliases.AliasError, ValueError, TypeError) as error:
            return Entry(name, value, "unsupported", {}, str(error).split(": ", 1)[-1])
        why = settings.pop(aliases.WARNING, "")
        if not settings and not why:
            return Entry(name, value, "ignored", {}, "asks for nothing (empty or false)")
        return Entry(name, value, "changed" if settings else "ignored", settings, why or "translated by meaning")
    if name in aliases.RENAMES:
        key = aliases.RENAMES[name][0]
        return Entry(name, value, "mapped", {key: value})
    if name in aliases.IGNORED:
        return Entry(name, value, "ignored", {}, aliases.IGNORED[name])
    if name in aliases.UNSUPPORTED:
        if value in (None, "", False, [], {}):
            return Entry(name, value, "ignored", {}, "asks for nothing (empty or false)")
        return Entry(name, value, "unsupported", {}, aliases.UNSUPPORTED[name])
    return Entry(name, value, "unsupported", {}, "no lmtune setting has this meaning")


ZERO_STAGE = re.compile(r"(?:zero|z)[_-]?([0-3])", re.IGNORECASE)
ZERO_SHARDING = {3: "full_shard", 2: "shard_grad_op", 1: "shard_grad_op"}


def _deepspeed(value: Any, folder: Optional[Path]) -> Entry:
    """A DeepSpeed config (a JSON file, its name, or the mapping) as the FSDP settings of the same sharding."""
    settings: Any = value if isinstance(value, dict) else None
    if isinstance(value, str):
        for candidate in (Path(value), (folder or Path(".")) / value):
            if candidate.is_file():
                try:
                    settings = json.loads(candidate.read_text())
                except (OSError, json.JSONDecodeError):
                    settings = None
                break
    zero = (settings or {}).get("zero_optimization", {}) if isinstance(settings, dict) else {}
    stage = zero.get("stage") if isinstance(zero, dict) else None
    named = ZERO_STAGE.search(str(value)) if isinstance(value, str) else None
    if stage is None and named:
        stage = int(named.group(1))
    if not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        return Entry("deepspeed", value, "unsupported", {}, aliases.UNSUPPORTED["deepspeed"] +
                     " (no ZeRO stage found in it to translate)")
    if stage == 0:
        return Entry("deepspeed", value, "changed", {}, "ZeRO stage 0 shards nothing: plain data parallel, lmtune's default")
    offload = any(isinstance(zero.get(k), dict) and zero[k].get("device") == "cpu" for k in ("offload_param", "offload_optimizer"))
    offload = offload or (isinstance(value, str) and "offload" in value.lower())
    out: dict[str, Any] = {"enable_fsdp": True, "fsdp_sharding_strategy": ZERO_SHARDING[stage]}
    if offload:
        out["fsdp_offload_params"] = True
    why = {3: "ZeRO-3 shards weights, gradients and optimizer state: FSDP full_shard",
           2: "ZeRO-2 shards gradients and optimizer state: FSDP shard_grad_op",
           1: "ZeRO-1 shards optimizer state only; FSDP's nearest is shard_grad_op (it shards gradients too)"}[stage]
    return Entry("deepspeed", value, "changed", out, why + ("; its CPU offload: fsdp_offload_params" if offload else ""))


# What each tool does when a key is left out, where lmtune's own default differs: written out by convert.
TOOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "llamafactory": {"learning_rate": 5e-5, "epochs": 3.0, "micro_batch_size": 8, "max_input_length": 2048,
                     "lora_dropout": 0.0},
    "axolotl": {"method": "full", "max_input_length": 512, "lr_scheduler": "cosine", "optimizer": "adamw_torch_fused",
                "lora_dropout": 0.0},
}
DEFAULT_WHY = {
    ("axolotl", "method"): "no adapter: Axolotl fine-tunes every weight",
}


def _tool_defaults(source: str, settings: dict[str, Any]) -> list[Entry]:
    """The tool's defaults for keys the config leaves out, as entries (lmtune's defaults differ)."""
    out = []
    for key, value in TOOL_DEFAULTS.get(source, {}).items():
        if key in settings:
            continue
        if key == "lora_dropout" and settings.get("method", TOOL_DEFAULTS[source].get("method", "lora")) == "full":
            continue
        why = DEFAULT_WHY.get((source, key), f"{aliases.TOOL_LABEL.get(source, source)}'s default when the key is left out")
        out.append(Entry(f"({key} left out)", "", "changed", {key: value}, why))
    return out


def _special(source: str, name: str, value: Any, raw: dict[str, Any], dataset_info: Optional[Path],
             folder: Optional[Path] = None) -> Optional[Entry]:
    """Keys whose meaning depends on the tool, or that the generic tables do not hold."""
    if name == "deepspeed" and isinstance(value, (str, dict)) and value:
        return _deepspeed(value, folder)
    if source == "llamafactory" and name == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
        return Entry(name, value, "changed", {"warmup_ratio": value}, "a fraction below 1 is a share of the run: warmup_ratio")
    if source == "llamafactory" and name == "dataset":
        return _llamafactory_dataset(value, dataset_info)
    if source == "llamafactory" and name == "eval_dataset" and dataset_info is not None:
        entry = _llamafactory_dataset(value, dataset_info)
        return Entry(name, value, "changed", {"validation_dataset": entry.settings["dataset"]}, entry.why)
    if name in ("evaluation_strategy",):
        text = str(value).lower()
        return Entry(name, value, "changed", {"eval_strategy": "no" if text == "none" else text}, "the old transformers name of eval_strategy")
    if name.startswith("flash_attn") or name == "flash_attention":
        if name in ("flash_attention", "flash_attn") and str(value).lower() in ("true", "fa2", "auto", "1"):
            return Entry(name, value, "changed", {"attn_implementation": "flash_attention_2"}, "flash attention 2 (CUDA only)")
        return Entry(name, value, "ignored", {}, "fused flash-attention kernels are chosen by attn_implementation")
    if name == "report_to":
        wanted = [value] if isinstance(value, str) else list(value or [])
        known = ("tensorboard", "jsonl", "wandb", "mlflow", "stdout")
        kept = [t for t in wanted if t in known]
        dropped = [t for t in wanted if t not in (*known, "none", "all")]
        if "all" in wanted:
            kept = ["jsonl", "tensorboard"]
            return Entry(name, value, "changed", {"report_to": kept}, "all means every installed integration in transformers; "
                         "lmtune writes metrics.jsonl and TensorBoard (add wandb or mlflow by name)")
        if dropped:
            return Entry(name, value, "unsupported", {"report_to": kept} if kept else {},
                         f"{', '.join(dropped)}: not built in; lmtune reports to {', '.join(known)}")
        return Entry(name, value, "mapped", {"report_to": kept})
    if source == "axolotl" and name == "bf16" and str(value).lower() == "auto":
        return Entry(name, value, "changed", {"precision": "bf16"}, "auto means bf16 where the device has it; lmtune's check refuses bf16 where it cannot run")
    if name in ("sample_packing", "packing", "neat_packing", "packed") and source in ("axolotl", "llamafactory", "torchtune"):
        if not _truthy(value):
            if name == "neat_packing" or (name == "packing" and _truthy(raw.get("neat_packing"))):
                return Entry(name, value, "mapped", {})  # the other of LLaMA-Factory's two packing keys decides
            return Entry(name, value, "changed", {"pack_to_length": False},
                         "examples are not packed to a length; lmtune still lays each micro batch out without padding (packing: false pads)")
        if source == "llamafactory" and name == "packing" and not _truthy(raw.get("neat_packing")):
            return Entry(name, value, "changed", {"pack_to_length": True},
                         "packed to cutoff_len with each example attending only to itself (LLaMA-Factory's packing lets packed examples "
                         "see each other; its neat_packing does not)")
        return Entry(name, value, "mapped", {"pack_to_length": True})
    if source == "jumpstart" and name == "epoch":
        return Entry(name, value, "mapped", {"epochs": coerce_string(value)})
    return None


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _dataset_info_beside(raw: dict[str, Any], folder: Optional[Path]) -> Optional[Path]:
    """LLaMA-Factory's dataset_info.json in the config's dataset_dir (its default: data), when it is there."""
    if folder is None:
        return None
    inside = str(raw.get("dataset_dir") or "data")
    for candidate in (folder / inside, folder.parent / inside, Path(inside), folder):
        if (candidate / "dataset_info.json").is_file():
            return candidate / "dataset_info.json"
    return None


def convert(raw: dict[str, Any], source: Optional[str] = None, dataset_info: Optional[Path] = None,
            folder: Optional[Path] = None) -> Conversion:
    """`folder`: where the file came from (its dataset_info.json and DeepSpeed configs are looked for there)."""
    if not isinstance(raw, dict) or not raw:
        raise ConvertError("convert: the file holds no settings (an empty file, or not a mapping of keys)")
    source = source or detect(raw)
    if source == "llamafactory" and dataset_info is None:
        dataset_info = _dataset_info_beside(raw, folder)
        names = raw.get("dataset") or ""
        listed = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
        if dataset_info is not None and not set(listed) <= set(_read_info(dataset_info)):
            dataset_info = None  # found, but it lists other datasets: the names stay unresolved, and check says so
    entries: list[Entry] = []
    rest = raw
    if source == "torchtune":
        entries, rest = _torchtune(raw)
    for name, value in rest.items():
        entry = _special(source, str(name), value, raw, dataset_info, folder) or _generic(str(name), value)
        entries.append(entry)
    entries += _tool_defaults(source, {k: v for e in entries for k, v in e.settings.items()})
    settings: dict[str, Any] = {}
    for entry in entries:
        for key, value in entry.settings.items():
            if key in settings and settings[key] != value and key == "method" and {settings[key], value} == {"lora", "qlora"}:
                value = "qlora"  # a LoRA method with a 4-bit base is qlora
            settings[key] = value
    for key, table in aliases.VALUE_ALIASES.items():  # values other tools spell differently
        value = settings.get(key)
        if isinstance(value, str) and value.strip().lower() in table and table[value.strip().lower()] != value:
            new = table[value.strip().lower()]
            entries.append(Entry(f"{key} value", value, "changed", {key: new}, aliases.VALUE_NOTES.get((key, value.strip().lower()), "the same choice, lmtune's spelling")))
            settings[key] = new
    return Conversion(source, settings, entries)


# -- output --------------------------------------------------------------------------------------------


def _short(value: Any) -> str:
    if isinstance(value, dict) and "_component_" in value:
        return str(value["_component_"])
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def to_yaml(conversion: Conversion, origin: str) -> str:
    import yaml

    by_key: dict[str, list[Entry]] = {}
    for entry in conversion.entries:
        for key in entry.settings:
            by_key.setdefault(key, []).append(entry)
    lines = [f"# Converted by `lmtune convert` from {origin} ({conversion.source}). Every source key is listed: mapped,",
             "# changed in meaning (old -> new, with why), ignored or unsupported (at the end, with why).", ""]
    group = None
    for key in (k for k in KEY_GROUP if k in conversion.settings):
        if KEY_GROUP[key] != group:
            group = KEY_GROUP[key]
            lines.append(f"# -- {group}")
        notes = []
        for entry in by_key.get(key, []):
            if entry.kind == "changed":
                shown = entry.source_key if isinstance(entry.value, dict) else f"{entry.source_key}: {_short(entry.value)}"
                notes.append(f"from {shown}" + (f" ({entry.why})" if len(entry.settings) == 1 else ""))
            elif entry.source_key != key:
                notes.append(f"from {entry.source_key}")
        dumped = yaml.safe_dump({key: conversion.settings[key]}, sort_keys=False, default_flow_style=False, width=1000).rstrip()
        lines.append(dumped + (f"  # {'; '.join(notes)}" if notes and "\n" not in dumped else ""))
        if notes and "\n" in dumped:
            lines.insert(len(lines) - 1, f"# {'; '.join(notes)}")
    for kind in ("ignored", "unsupported"):
        listed = conversion.of_kind(kind)
        if listed:
            lines += ["", f"# -- {kind} ({len(listed)})"]
            lines += [f"# {e.source_key}: {_short(e.value)}  -- {e.why}" for e in listed]
    return "\n".join(lines) + "\n"


def summary(conversion: Conversion) -> str:
    rows = [f"converted from {conversion.source}:"]
    for kind, label in (("mapped", "mapped"), ("changed", "changed in meaning"), ("ignored", "ignored"), ("unsupported", "unsupported")):
        listed = conversion.of_kind(kind)
        rows.append(f"  {label}: {len(listed)}")
        for entry in listed:
            target = ", ".join(f"{k}={_short(v)}" for k, v in entry.settings.items())
            if kind == "mapped":
                rows.append(f"    {entry.source_key} -> {target}")
            elif kind == "changed":
                rows.append(f"    {entry.source_key}: {_short(entry.value)} -> {target or '(nothing)'}  ({entry.why})")
            else:
                rows.append(f"    {entry.source_key}: {entry.why}")
    return "\n".join(rows)


def read_source(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConvertError(f"convert: {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConvertError(f"convert: {path} is not a YAML or JSON config ({type(error).__name__})") from None
    if raw is None or raw == {}:
        raise ConvertError(f"convert: {path} holds no settings (an empty file)")
    if not isinstance(raw, dict):
        raise ConvertError(f"convert: {path} is not a config (expected a mapping of keys, found {type(raw).__name__})")
    return raw


TRANSLATION_HOW = {
    "bf16": "true or auto sets `precision: bf16`",
    "fp16": "true sets `precision: fp16`",
    "fp32": "true sets `precision: fp32`",
    "mixed_precision": "`precision` (no -> fp32)",
    "adapter": "`method`: lora or qlora; empty means full",
    "load_in_4bit": "true sets `method: qlora`",
    "quantization_bit": "4 sets `method: qlora`, 8 sets `int8_quantization`",
    "rl": "`stage: dpo` (ipo/orpo/simpo as `pref_loss`), `stage: kto` or `stage: grpo`",
    "trl": "the GRPO block: `beta`, `num_generations`, `max_completion_length` -> `max_new_tokens`, `reward_funcs` "
           "(module.function -> `file.py:function`) -> `reward_function`, `loss_type` -> `grpo_loss`, ...; vLLM keys not needed",
    "reward_funcs": "`reward_function`: module.function becomes `module.py:function`; ms-swift's accuracy is `exact_match`",
    "rlhf_type": "ms-swift's stage: `stage` (orpo and simpo as dpo's `pref_loss`)",
    "lora_target_linear": "true sets `lora_target: [all]`",
    "flash_attention": "true sets `attn_implementation: flash_attention_2`",
    "sdp_attention": "true sets `attn_implementation: sdpa`",
    "val_set_size": "a fraction becomes `validation_split_ratio`; a row count is refused with the fix",
    "fsdp": "`enable_fsdp`, `fsdp_sharding_strategy`, `fsdp_offload_params`",
    "fsdp_config": "`fsdp_sharding_strategy`, `fsdp_offload_params`",
    "datasets": "each entry's `type` and `field_*` become a `dataset` entry's `format` and `columns` (transform functions are not run)",
    "test_datasets": "the same, as `validation_dataset`",
    "special_tokens": "pad_token is ignored (lmtune pads with the tokenizer's own); changing other tokens is refused",
}


def migrating_markdown() -> str:
    """docs/migrating.md: the key tables `convert` and `check` read other tools' configs with."""
    lines = [
        "# Moving to lmtune from other tools",
        "",
        "Generated from lmtune's translation tables (`lmtune convert --markdown > docs/migrating.md`).",
        "`lmtune convert FILE -o my.yaml` applies them to a whole file and lists every key as mapped, changed",
        "in meaning, ignored or unsupported; `lmtune check` reads the same keys directly. Keys a tool spells",
        "as lmtune does (`lora_r`, `micro_batch_size`, `learning_rate`, ...) mean the same and are not listed.",
        "",
    ]
    for tool in ("axolotl", "llamafactory", "torchtune", "jumpstart"):
        label = aliases.TOOL_LABEL[tool]
        renames = sorted((name, key) for name, (key, tools) in aliases.RENAMES.items() if tool in tools)
        translated = sorted(name for name, owner in aliases.TRANSLATION_TOOL.items() if owner == tool)
        lines += [f"## {label}", "", "| their key | lmtune setting | how |", "|---|---|---|"]
        lines += [f"| `{name}` | `{key}` | same meaning |" for name, key in renames]
        lines += [f"| `{name}` | by value | {TRANSLATION_HOW.get(name, 'translated by value')} |" for name in translated]
        if tool == "llamafactory":
            lines += ["| `warmup_steps` below 1 | `warmup_ratio` | a fraction of the run, not a step count |",
                      "| `dataset` names | `dataset` entries | resolved through `--dataset-info dataset_info.json` (file, columns, formatting, ranking) |",
                      "| `packing: true` | `pack_to_length: true` | by `convert`: rows filled to cutoff_len, each example attending only to itself (as neat_packing) |"]
        if tool == "torchtune":
            lines += [f"| `{theirs}` | `{ours}` | same meaning |" for theirs, ours in TORCHTUNE_PLAIN.items()]
            lines += ["| `model` block | `method`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target` | read from the builder's name and arguments |",
                      "| `checkpointer.checkpoint_dir` | `base_model` | the Hugging Face checkpoint folder |",
                      "| `optimizer` block | `optimizer`, `learning_rate`, `weight_decay`, `adam_*` | by the class it names |",
                      "| `lr_scheduler` block | `lr_scheduler`, `warmup_steps` | by the function it names |",
                      "| `loss` block | `stage: dpo`, `pref_loss`, `pref_beta`, `dpo_label_smoothing` | DPO, IPO, RSO (hinge), SimPO losses |",
                      "| `dataset` block | `dataset` entries | by the builder (its source, column_map, split) |",
                      "| `dtype` | `precision` | bf16 keeps fp32 master weights |",
                      "| `max_steps_per_epoch` | `max_steps` | x epochs: lmtune caps the whole run |"]
        lines.append("")
    lines += ["## Read but without effect (any tool)", "", "| key | why |", "|---|---|"]
    lines += [f"| `{name}` | {why} |" for name, why in sorted(aliases.IGNORED.items())]
    lines += ["", "## Refused with the fix (any tool)", "", "| key | what to do |", "|---|---|"]
    lines += [f"| `{name}` | {why} |" for name, why in sorted(aliases.UNSUPPORTED.items())]
    return "\n".join(lines) + "\n"
