"""`lmtune convert`: every real config from the other tools converts, passes `check` on test fixtures, and
every source key is accounted for."""

import json

import pytest
import yaml

from conftest import COMPAT, ROOT
from lmtune.cli import main
from lmtune.convert import ConvertError, convert, read_source

EXAMPLE_DATA = ROOT / "examples" / "data"
SOURCES = sorted([*(COMPAT / "axolotl").glob("*.yml"), *(COMPAT / "llamafactory").glob("*.yaml"), *(COMPAT / "torchtune").glob("*.yaml")])
DATA_FOR_STAGE = {
    "pt": EXAMPLE_DATA / "notes.txt",
    "sft": EXAMPLE_DATA / "reverse.jsonl",
    "rm": EXAMPLE_DATA / "reverse_preferences.jsonl",
    "dpo": EXAMPLE_DATA / "reverse_preferences.jsonl",
    "ppo": EXAMPLE_DATA / "reverse.jsonl",
}


@pytest.mark.parametrize("path", SOURCES, ids=[f"{p.parent.name}/{p.name}" for p in SOURCES])
def test_every_compat_config_converts_and_passes_check(path, tmp_path, capsys):
    out = tmp_path / "converted.yaml"
    source = read_source(path)
    known = json.loads((COMPAT / "llamafactory" / "dataset_info.json").read_text())
    names = str(source.get("dataset", "")).split(",")
    # LLaMA-Factory dataset names resolve through dataset_info.json when it lists them (one of the fixtures names one it lacks)
    info_path = COMPAT / "llamafactory" / "dataset_info.json" if path.parent.name == "llamafactory" and all(n.strip() in known for n in names) else None
    info = ["--dataset-info", str(info_path)] if info_path else []
    assert main(["convert", str(path), "-o", str(out), *info]) == 0
    printed = capsys.readouterr().out
    converted = yaml.safe_load(out.read_text())
    conversion = convert(source, dataset_info=info_path)
    # nothing dropped silently: every source key is in the summary, under one of the four headings
    accounted = {e.source_key.split(" value")[0].split(".")[0] for e in conversion.entries}
    assert set(map(str, source)) <= accounted, set(map(str, source)) - accounted
    for entry in conversion.of_kind("unsupported") + conversion.of_kind("ignored"):
        assert f"# {entry.source_key}:" in out.read_text() and f"{entry.source_key}: " in printed
    # the result is an lmtune config that check accepts once model and data point at fixtures
    stage = converted.get("stage", "sft")
    overrides = ["--set", "base_model=builtin:tiny", "--set", f"dataset={DATA_FOR_STAGE[stage]}", "--set", f"output_dir={tmp_path / 'run'}"]
    if stage == "ppo":
        overrides += ["--set", "reward_model=null", "--set", f"reward_function={ROOT / 'examples' / 'rewards.py'}:reversed_digits"]
    if converted.get("attn_implementation") == "flash_attention_2":
        overrides += ["--set", "attn_implementation=sdpa"]  # flash attention needs CUDA; CI has none
    code = main(["check", str(out), *overrides])
    assert code == 0, capsys.readouterr().out


@pytest.mark.parametrize("tool", ["axolotl", "llamafactory", "torchtune"])
def test_at_least_ten_values_mapped_per_tool(tool):
    for path in (p for p in SOURCES if p.parent.name == tool):
        conversion = convert(read_source(path))
        assert len(conversion.settings) >= 10, (path.name, conversion.settings)


def test_translations_change_meaning_not_just_names(tmp_path):
    llamafactory = convert({"model_name_or_path": "m", "finetuning_type": "lora", "warmup_steps": 0.1, "evaluation_strategy": "steps",
                            "per_device_train_batch_size": 2, "cutoff_len": 512})
    assert llamafactory.source == "llamafactory"
    assert llamafactory.settings["warmup_ratio"] == 0.1 and "warmup_steps" not in llamafactory.settings
    assert llamafactory.settings["eval_strategy"] == "steps" and llamafactory.settings["micro_batch_size"] == 2
    axolotl = convert(read_source(COMPAT / "axolotl" / "lora-8b.yml"))
    s = axolotl.settings
    assert s["precision"] == "bf16"  # bf16: auto
    assert s["lora_target"] == ["all"]  # lora_target_linear: true
    assert s["method"] == "lora" and s["int8_quantization"] is True  # adapter: lora + load_in_8bit
    assert s["validation_split_ratio"] == 0.05 and s["optimizer"] == "adamw_8bit"
    assert s["dataset"] == [{"path": "mhenrichsen/alpaca_2k_test", "format": "instruction"}]
    assert s["pack_to_length"] is True and s["max_input_length"] == 4096  # sample_packing: rows filled to sequence_len
    padded = convert(read_source(COMPAT / "axolotl" / "instruct-dpo-lora-8b.yml")).settings
    assert padded["pack_to_length"] is False  # sample_packing: false
    llamafactory_packed = convert({"model_name_or_path": "m", "packing": True, "cutoff_len": 256})
    assert llamafactory_packed.settings["pack_to_length"] is True
    assert any(e.source_key == "packing" and e.kind == "changed" and "see each other" in e.why for e in llamafactory_packed.entries)
    neat = convert({"model_name_or_path": "m", "packing": False, "neat_packing": True, "cutoff_len": 256}).settings
    assert neat["pack_to_length"] is True
    torchtune = convert(read_source(COMPAT / "torchtune" / "8B_lora_dpo.yaml")).settings
    assert torchtune["stage"] == "dpo" and torchtune["pref_beta"] == 0.1 and torchtune["method"] == "lora"
    assert torchtune["lora_target"] == ["q_proj", "v_proj", "o_proj", "mlp"] and torchtune["lora_r"] == 8
    assert torchtune["base_model"] == "/tmp/Meta-Llama-3.1-8B-Instruct/" and torchtune["learning_rate"] == 5e-4
    assert torchtune["lr_scheduler"] == "cosine" and torchtune["warmup_steps"] == 100 and torchtune["precision"] == "bf16"
    assert torchtune["max_steps"] == 1000 and torchtune["micro_batch_size"] == 4 and torchtune["gradient_checkpointing"] is True
    resolved = convert(read_source(COMPAT / "llamafactory" / "llama3_lora_dpo.yaml"), dataset_info=COMPAT / "llamafactory" / "dataset_info.json")
    assert resolved.settings["dataset"] == [{
        "path": str(COMPAT / "llamafactory" / "dpo_en_demo.json"), "format": "preference", "columns": {"messages": "conversations"},
    }]


def test_unsupported_keys_are_reported_by_name(capsys):
    conversion = convert(read_source(COMPAT / "llamafactory" / "qwen3_full_sft_fsdp.yaml"))
    unsupported = {e.source_key for e in conversion.of_kind("unsupported")}
    assert {"attn", "enable_liger_kernel"} <= unsupported
    assert conversion.settings["report_to"] == ["wandb"]  # report_to: wandb
    special = convert(read_source(COMPAT / "axolotl" / "instruct-dpo-lora-8b.yml"))
    assert "special_tokens" in {e.source_key for e in special.of_kind("unsupported")}


@pytest.mark.parametrize(
    "content,message",
    [
        ("just: words\nnothing: known\n", "cannot tell which tool wrote this file"),
        ("- a\n- list\n", "is not a config"),
        ("", "holds no settings"),
        ("model_name_or_path: m\nfinetuning_type: lora\ndataset: nope\n", "dataset: nope is not in"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "in.yaml"
    path.write_text(content)
    info = ["--dataset-info", str(COMPAT / "llamafactory" / "dataset_info.json")]
    assert main(["convert", str(path), *info]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_conversion_error_is_a_user_error():
    with pytest.raises(ConvertError):
        convert({"unknown_key": 1})


def test_migrating_doc_is_generated_from_the_tables():
    from lmtune.convert import migrating_markdown

    assert (ROOT / "docs" / "migrating.md").read_text() == migrating_markdown(), "run: lmtune convert --markdown > docs/migrating.md"
    assert "| `num_epochs` | `epochs` | same meaning |" in migrating_markdown()


# What each tool runs for its own file: read off the file and the tool's documented defaults for keys it leaves out.
# (method, precision, micro batch, accumulation, learning rate, epochs, scheduler, max length, stage, fsdp sharding)
WHAT_THE_TOOL_RUNS = {
    "axolotl/fft-8b-fsdp.yml": ("full", "bf16", 1, 1, 2e-5, 1, "cosine", 8192, "sft", "full_shard"),
    "axolotl/instruct-dpo-lora-8b.yml": ("lora", "bf16", 2, 4, 2e-4, 4, "cosine", 4096, "dpo", None),
    "axolotl/lora-8b.yml": ("lora", "bf16", 2, 4, 2e-4, 4, "cosine", 4096, "sft", None),
    "axolotl/qlora.yml": ("qlora", "bf16", 2, 4, 2e-4, 4, "cosine", 4096, "sft", None),
    "llamafactory/llama3_lora_dpo.yaml": ("lora", "bf16", 1, 8, 5e-6, 3, "cosine", 2048, "dpo", None),
    "llamafactory/llama3_lora_ppo.yaml": ("lora", "bf16", 1, 8, 1e-5, 3, "cosine", 2048, "ppo", None),
    "llamafactory/llama3_lora_pretrain.yaml": ("lora", "bf16", 1, 8, 1e-4, 3, "cosine", 2048, "pt", None),
    "llamafactory/llama3_lora_reward.yaml": ("lora", "bf16", 1, 8, 1e-4, 3, "cosine", 2048, "rm", None),
    "llamafactory/llama3_lora_sft.yaml": ("lora", "bf16", 1, 8, 1e-4, 3, "cosine", 2048, "sft", None),
    "llamafactory/llama3_lora_sft_otfq.yaml": ("qlora", "bf16", 1, 8, 1e-4, 3, "cosine", 2048, "sft", None),
    "llamafactory/qwen3_full_sft_fsdp.yaml": ("full", "bf16", 1, 2, 2e-5, 3, "cosine", 32768, "sft", None),
    "torchtune/8B_lora_dpo.yaml": ("lora", "bf16", 4, 8, 5e-4, 1, "cosine", -1, "dpo", None),
}


@pytest.mark.parametrize("name", sorted(WHAT_THE_TOOL_RUNS))
def test_a_converted_config_runs_what_the_tool_would(name):
    from lmtune.config import resolve

    conversion = convert(read_source(COMPAT / name), dataset_info=COMPAT / "llamafactory" / "dataset_info.json"
                         if name == "llamafactory/llama3_lora_dpo.yaml" else None)
    settings = {k: v for k, v in conversion.settings.items() if k not in ("dataset", "validation_dataset")}
    resolved = resolve(data={**settings, "base_model": "builtin:tiny", "dataset": "data.jsonl"})
    c = resolved.config
    assert c is not None, resolved.problems
    f, t, d = c.finetuning, c.training, c.data
    resolved = (f.method, c.precision.precision, t.micro_batch_size, t.gradient_accumulation_steps, float(t.learning_rate),
                t.epochs, t.lr_scheduler, d.max_input_length, f.stage,
                c.distributed.fsdp_sharding_strategy if c.distributed.enable_fsdp else None)
    assert resolved == WHAT_THE_TOOL_RUNS[name]


def test_deepspeed_zero_configs_become_fsdp_of_the_same_sharding(tmp_path):
    zero3 = tmp_path / "ds_z3_offload_config.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    for value, expected in (
        (str(zero3), {"enable_fsdp": True, "fsdp_sharding_strategy": "full_shard", "fsdp_offload_params": True}),
        ("examples/deepspeed/ds_z3_config.json", {"enable_fsdp": True, "fsdp_sharding_strategy": "full_shard"}),
        ("deepspeed_configs/zero2.json", {"enable_fsdp": True, "fsdp_sharding_strategy": "shard_grad_op"}),
        ({"zero_optimization": {"stage": 1}}, {"enable_fsdp": True, "fsdp_sharding_strategy": "shard_grad_op"}),
    ):
        conversion = convert({"model_name_or_path": "x", "stage": "sft", "deepspeed": value}, "llamafactory")
        assert {k: conversion.settings[k] for k in expected} == expected and not conversion.of_kind("unsupported")


def test_llamafactory_dataset_names_without_dataset_info_are_refused_by_check_in_one_line(tmp_path, capsys):
    out = tmp_path / "c.yaml"
    source = tmp_path / "sft.yaml"
    source.write_text("model_name_or_path: builtin:tiny\nstage: sft\nfinetuning_type: lora\ndataset: alpaca_en_demo\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["convert", str(source), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["check", str(out)]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "alpaca_en_demo is a LLaMA-Factory dataset name" in errors[0] and "--dataset-info" in errors[0]


def test_every_template_name_other_tools_write_converts_to_a_config_check_accepts(tmp_path, capsys):
    from lmtune.data.templates import TEMPLATE_NAMES

    names = ["llama2", "llama3", "qwen", "qwen2", "qwen_25", "qwen3", "qwen3_nothink", "gemma", "gemma2", "gemma3", "phi3",
             "phi_3", "phi4", "mistral", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "mistral_v7_tekken", "deepseek",
             "deepseek3", "deepseekr1", "glm4", "cohere", "gpt", "zephyr", "vicuna", "chatml", "alpaca", "tokenizer_default"]
    assert set(names) <= set(TEMPLATE_NAMES)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    for tool, key in (("llamafactory", "template"), ("axolotl", "chat_template")):
        for name in names:
            raw = ({"model_name_or_path": "builtin:tiny", "stage": "sft", "template": name} if tool == "llamafactory"
                   else {"base_model": "builtin:tiny", "adapter": "lora", "chat_template": name})
            settings = convert(raw, tool).settings
            out = tmp_path / "c.yaml"
            out.write_text(yaml.safe_dump({**settings, "dataset": str(data), "output_dir": str(tmp_path / "run")}))
            assert main(["check", str(out)]) == 0, (tool, name, capsys.readouterr().out)
            capsys.readouterr()
