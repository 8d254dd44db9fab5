"""Every setting, under its own name and every other tool's name, reaches the resolved config."""

import typing

import pytest

from lmtune.config import resolve
from lmtune.config.aliases import RENAMES
from lmtune.config.schema import KEY_GROUP, default_of, field_info

# Values for settings whose type alone does not give a good sample.
SAMPLES = {
    "dataset": ["org/some-dataset"],
    "validation_dataset": ["org/some-eval-set"],
    "dataset_columns": {"instruction": "question"},
    "dataset_weights": [0.5],
    "template": "chatml",
    "report_to": ["tensorboard"],
    "lora_target": ["q_proj", "v_proj"],
    "lora_modules_to_save": ["lm_head"],
    "freeze_trainable_modules": ["mlp"],
    "freeze_extra_modules": ["embed_tokens"],
    "early_stopping_metric": "eval_perplexity",
    "resume_from_checkpoint": "latest",
    "sagemaker_container_log_level": 20,
    "max_input_length": 512,
    "max_train_samples": 100,
    "max_val_samples": 10,
    "max_steps": 50,
    "freeze_trainable_layers": 4,
    "reward_function": "rewards.py:score",
    "reward_weights": [1.0, 0.5],
}


def sample_value(key: str):
    """A valid value that differs from the default."""
    if key in SAMPLES:
        return SAMPLES[key]
    info = field_info(key)
    default = default_of(key)
    annotation = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return next(v for v in typing.get_args(annotation) if v != default)
    if annotation is bool:
        return not default
    if annotation is str:
        return "some/value"
    if annotation is int:
        return (default or 0) + 3
    if annotation is float:
        bounds = {type(m).__name__: m for m in info.metadata}
        upper = bounds["Lt"].lt if "Lt" in bounds else bounds["Le"].le if "Le" in bounds else None
        if upper is not None:
            return round(((default or 0.0) + upper) / 2, 4) if default != upper else upper / 2
        return (default or 0.5) * 2 + 0.25
    raise AssertionError(f"add a sample value for {key}")


def resolved_value(config, key):
    value = getattr(getattr(config, KEY_GROUP[key]), key)
    if isinstance(value, list):
        return [v.model_dump() if hasattr(v, "model_dump") else v for v in value]
    return value


@pytest.mark.parametrize("key", sorted(KEY_GROUP))
def test_setting_under_its_own_name(key):
    value = sample_value(key)
    assert value != default_of(key)
    resolved = resolve(data={key: value})
    assert resolved.config is not None, resolved.problems
    assert resolved_value(resolved.config, key) == value
    assert resolved.sources[key].origin == "file"


ALIAS_CASES = sorted((name, key) for name, (key, _) in RENAMES.items())


@pytest.mark.parametrize("alias,key", ALIAS_CASES)
def test_setting_under_another_tools_name(alias, key):
    value = sample_value(key)
    resolved = resolve(data={alias: value})
    assert resolved.config is not None, resolved.problems
    assert resolved_value(resolved.config, key) == value
    assert resolved.sources[key].origin == "alias"
    assert resolved.sources[key].name == alias


def test_alias_table_covers_the_issue_names():
    expected = {
        "epoch": "epochs",
        "per_device_train_batch_size": "micro_batch_size",
        "num_epochs": "epochs",
        "sequence_len": "max_input_length",
        "lora_target_modules": "lora_target",
        "val_set_size": "validation_split_ratio",
        "finetuning_type": "method",
        "lora_rank": "lora_r",
        "cutoff_len": "max_input_length",
        "num_train_epochs": "epochs",
        "lr_scheduler_type": "lr_scheduler",
        "optim": "optimizer",
        "load_in_8bit": "int8_quantization",
    }
    for alias, key in expected.items():
        resolved = resolve(data={alias: sample_value(key)})
        assert resolved.config is not None, (alias, resolved.problems)
        assert resolved.was_set(key), alias


@pytest.mark.parametrize(
    "raw,key,expected",
    [
        ("True", "chat_dataset", True),
        ("False", "enable_fsdp", False),
        ("None", "early_stopping_patience", None),
        ("-1", "max_input_length", -1),
        ("0.0001", "learning_rate", 0.0001),
        ('"cosine"', "lr_scheduler", "cosine"),
        ("5", "epoch", 5.0),
        ("q_proj,v_proj", "lora_target", ["q_proj", "v_proj"]),
        ('["q_proj", "k_proj"]', "lora_target_modules", ["q_proj", "k_proj"]),
    ],
)
def test_sagemaker_strings_are_coerced(raw, key, expected):
    resolved = resolve(data={key: raw})
    assert resolved.config is not None, resolved.problems
    canonical = RENAMES[key][0] if key in RENAMES else key
    assert resolved_value(resolved.config, canonical) == expected


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"adapter": "qlora"}, {"method": "qlora"}),
        ({"adapter": None}, {"method": "full"}),
        ({"load_in_4bit": True, "adapter": "lora"}, {"method": "qlora"}),
        ({"finetuning_type": "lora", "quantization_bit": 4}, {"method": "qlora"}),
        ({"quantization_bit": 8}, {"int8_quantization": True}),
        ({"bf16": "auto"}, {"precision": "bf16"}),
        ({"fp16": True, "bf16": False}, {"precision": "fp16"}),
        ({"mixed_precision": "bf16"}, {"precision": "bf16"}),
        ({"dtype": "bf16"}, {"precision": "bf16"}),
        ({"rl": "dpo"}, {"stage": "dpo"}),
        ({"rl": "ipo"}, {"stage": "dpo", "pref_loss": "ipo"}),
        ({"lora_target_linear": True}, {"lora_target": ["all"]}),
        ({"flash_attention": True}, {"attn_implementation": "flash_attention_2"}),
        ({"flash_attn": "fa2"}, {"attn_implementation": "flash_attention_2"}),
        ({"fsdp": ["full_shard", "auto_wrap"]}, {"enable_fsdp": True, "fsdp_sharding_strategy": "full_shard"}),
        ({"fsdp_config": {"fsdp_offload_params": True}}, {"fsdp_offload_params": True}),
        ({"optimizer": "adamw_bnb_8bit"}, {"optimizer": "adamw_8bit"}),
        ({"optim": "paged_adamw_32bit"}, {"optimizer": "adamw_torch"}),
        ({"template": "qwen"}, {"template": "chatml"}),
        ({"early_stopping_threshold": "0.01"}, {"early_stopping_min_delta": 0.01}),
    ],
)
def test_translations(data, expected):
    resolved = resolve(data=data)
    assert resolved.config is not None, resolved.problems
    flat = resolved.config.flat()
    for key, value in expected.items():
        assert flat[key] == value, key


def test_axolotl_dataset_entries_become_dataset_specs():
    resolved = resolve(
        data={
            "datasets": [
                {"path": "org/prefs", "type": "chat_template.default", "field_messages": "conversation"},
                {"path": "org/alpaca", "type": "alpaca"},
            ]
        }
    )
    first, second = resolved.config.data.dataset
    assert (first.path, first.format, first.columns) == ("org/prefs", "chat", {"messages": "conversation"})
    assert (second.path, second.format) == ("org/alpaca", "instruction")


def test_empty_foreign_keys_mean_default():
    resolved = resolve(data={"fp16": None, "deepspeed": None, "lora_model_dir": None, "dataset_prepared_path": None})
    assert resolved.config is not None
    assert not resolved.errors
    assert resolved.config.precision.precision == "fp32"


def test_override_beats_file_and_is_recorded(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nlora_r: 8\n")
    resolved = resolve(path, ["learning_rate=3e-4", "lora_rank=32"])
    assert resolved.config.training.learning_rate == 3e-4
    assert resolved.config.finetuning.lora_r == 32
    assert str(resolved.sources["learning_rate"]) == "--set learning_rate"


def test_same_value_twice_is_fine():
    resolved = resolve(data={"num_epochs": 2, "epochs": 2})
    assert not resolved.errors
    assert resolved.config.training.epochs == 2


@pytest.mark.parametrize("value", [True, False, None])
def test_packing_keeps_all_three_meanings(value):
    """Unset (exact wherever possible), true (insist) and false (padded) are different runs."""
    assert resolve(data={"packing": value}).config.data.packing is value
