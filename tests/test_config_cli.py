"""`lmtune check` and `lmtune explain` as a user meets them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.config.docs import configuration_markdown

from conftest import COMPAT, ROOT

BAD = sorted((ROOT / "tests" / "fixtures" / "bad_configs").glob("*.yaml"))


def expected_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: ")
    return first.removeprefix("# expect: ").strip()


def test_there_are_at_least_25_bad_configs():
    assert len(BAD) >= 25


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_fails_with_one_line_naming_the_key(path, capsys):
    code = main(["check", str(path)])
    out = capsys.readouterr()
    assert code == 1
    text = out.out + out.err
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors, text
    key = expected_key(path)
    assert any(key in line for line in errors), (key, errors)


def test_bad_config_from_the_shell_has_no_traceback():
    path = ROOT / "tests" / "fixtures" / "bad_configs" / "fp16_and_bf16.yaml"
    run = subprocess.run([sys.executable, "-m", "lmtune", "check", str(path)], capture_output=True, text=True)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    assert "`bf16`" in run.stdout and "`fp16`" in run.stdout


def test_yaml_error_names_line_and_column(capsys):
    main(["check", str(ROOT / "tests/fixtures/bad_configs/yaml_syntax.yaml")])
    assert "line 3, column" in capsys.readouterr().out


def test_typo_gets_a_suggestion(capsys):
    main(["check", str(ROOT / "tests/fixtures/bad_configs/typo_in_key.yaml")])
    assert "did you mean `learning_rate`?" in capsys.readouterr().out


@pytest.fixture()
def sagemaker_channels(monkeypatch):
    """JumpStart hyperparameters name neither model nor data: a training job's channels provide them."""
    monkeypatch.setenv("SM_CHANNEL_MODEL", "/opt/ml/input/data/model")
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")


@pytest.mark.parametrize("name", ["hyperparameters.json"])
def test_sagemaker_hyperparameters_pass_check(name, capsys, sagemaker_channels):
    code = main(["check", str(COMPAT / "sagemaker" / name)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "alias epoch (SageMaker JumpStart)" in out


def test_sagemaker_template_json_is_not_a_config_and_check_says_which_keys(capsys):
    code = main(["check", str(COMPAT / "sagemaker" / "template.json")])
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert code == 1
    assert [line.split(":")[1].strip() for line in errors] == ["prompt", "completion"]


def test_sagemaker_hyperparameters_resolve_to_typed_values(capsys, sagemaker_channels):
    main(["check", "--json", str(COMPAT / "sagemaker" / "hyperparameters.json")])
    report = json.loads(capsys.readouterr().out)
    config = report["config"]
    assert report["ok"] is True
    assert config["chat_dataset"] is True and config["instruction_tuned"] is False
    assert config["int8_quantization"] is True
    assert config["learning_rate"] == 0.0002 and config["epochs"] == 1.0
    assert config["max_input_length"] == -1 and config["micro_batch_size"] == 2
    assert config["sagemaker_container_log_level"] == 30
    assert config["sagemaker_job_name"] == "jumpstart-demo-llama-ft"
    assert report["sources"]["micro_batch_size"].startswith("alias per_device_train_batch_size")


def test_unsupported_keys_are_named(capsys):
    code = main(["check", str(COMPAT / "llamafactory" / "qwen3_full_sft_fsdp.yaml")])
    out = capsys.readouterr().out
    assert code == 1
    errors = {line.split(":")[1].strip() for line in out.splitlines() if line.startswith("error:")}
    assert errors == {"attn", "enable_liger_kernel"}  # report_to: wandb is read (and installed here)


@pytest.mark.parametrize(
    "path",
    [
        "axolotl/lora-8b.yml",
        "axolotl/qlora.yml",
        "axolotl/fft-8b-fsdp.yml",
        "llamafactory/llama3_lora_sft.yaml",
        "llamafactory/llama3_lora_sft_otfq.yaml",
        "llamafactory/llama3_lora_dpo.yaml",
        "llamafactory/llama3_lora_reward.yaml",
        "llamafactory/llama3_lora_pretrain.yaml",
        "llamafactory/llama3_lora_ppo.yaml",
    ],
)
def test_other_tools_configs_pass_check(path, capsys):
    code = main(["check", str(COMPAT / path)])
    assert code == 0, capsys.readouterr().out


def test_changed_special_tokens_are_refused_by_name(capsys):
    code = main(["check", str(COMPAT / "axolotl" / "instruct-dpo-lora-8b.yml")])
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert code == 1
    assert errors == ["error: special_tokens: changing eos_token is not supported yet; use a tokenizer that has them"]


def test_qlora_config_from_axolotl_resolves_as_qlora(capsys):
    main(["check", "--json", str(COMPAT / "axolotl" / "qlora.yml")])
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["method"] == "qlora"
    assert config["pack_to_length"] is True and config["max_input_length"] == 4096  # sample_packing: rows filled to sequence_len
    assert config["lora_target"] == ["all"] and config["precision"] == "bf16"


def test_check_and_explain_do_not_import_torch():
    code = (
        "import sys; from lmtune.cli import main; "
        f"main(['check', r'{COMPAT / 'sagemaker' / 'hyperparameters.json'}']); "
        f"main(['explain', r'{COMPAT / 'axolotl' / 'lora-8b.yml'}']); main(['explain', 'lora_r']); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datasets', 'peft')]; "
        "print('HEAVY', heavy)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in run.stdout


def test_importtime_shows_no_torch():
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import lmtune.cli"], capture_output=True, text=True, check=True
    )
    modules = [line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line]
    assert "lmtune.cli" in modules
    assert not [m for m in modules if m.split(".")[0] in ("torch", "transformers")]


def test_explain_key_tells_effect_default_and_other_names(capsys):
    assert main(["explain", "lora_rank"]) == 0
    out = capsys.readouterr().out
    assert "`lora_rank` is LLaMA-Factory, torchtune's name for lmtune's `lora_r`" in out
    assert "Raising it:" in out and "Lowering it:" in out
    assert "Default: 8" in out
    assert "SageMaker JumpStart: lora_r" in out and "Axolotl: lora_r" in out


def test_explain_unknown_key(capsys):
    assert main(["explain", "lora_rnk"]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_explain_config_comments_on_values(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nlearning_rate: 3.0e-6\nadam_beta2: 0.95\nlora_r: 16\nlora_alpha: 32\n")
    assert main(["explain", str(path)]) == 1  # the values are explained, and the missing model and data named
    captured = capsys.readouterr()
    out = captured.out
    assert "error: base_model: no model given" in captured.err and "error: dataset: no training data" in captured.err
    assert "very small for LoRA" in out and "typical for full fine-tuning" in out
    assert "lower than the usual 0.999" in out and "forgets faster" in out
    assert "scale of 2" in out
    assert "lora_dropout" not in out  # defaults get no commentary


def test_docs_are_generated_from_the_schema():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == configuration_markdown(), "run: lmtune explain --markdown > docs/configuration.md"
