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
