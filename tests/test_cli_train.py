"""`lmtune train`, `data`, `chat`, `eval` and `quickstart` as a user runs them."""

import json
import re
import subprocess
import sys

import pytest

from lmtune.cli import main


def test_quickstart_runs_offline_and_the_metric_improves(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "lmtune", "quickstart", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    found = re.search(r"exact-match accuracy: (\d+)% before -> (\d+)% after", run.stdout)
    assert found, run.stdout
    before, after = int(found.group(1)), int(found.group(2))
    assert after >= 80 and after > before + 50
    assert (tmp_path / "run" / "plots" / "loss.png").exists()
    assert "training:" in run.stderr  # the progress bar


def bad_train_config(tmp_path, **settings):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    values = {"base_model": "builtin:tiny", "dataset": str(data), "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "c")}
    values.update(settings)
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return str(path)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"stage": "ppo", "reward_model": "./runs/rm"}, "reward_model: ./runs/rm does not exist"),
        ({"stage": "pt"}, "stage pt cannot learn from chat rows"),
        ({"stage": "ppo", "reward_function": "nofile.py:f"}, "reward_function: the file nofile.py does not exist"),
        ({"learning_rate": 0}, "learning_rate: must be above 0"),
        ({"max_input_length": 99999}, "longer than the model's context"),
        ({"base_model": "./no/such/model"}, "base_model: ./no/such/model: no such folder"),
        ({"base_model": "builtin:huge"}, "no builtin model 'builtin:huge'"),
        ({"lora_target": ["nope"]}, "no linear layer named 'nope'"),
        ({"precision": "fp16"}, "fp16 needs a CUDA GPU"),
        ({"enable_fsdp": True, "method": "qlora"}, "enable_fsdp: bitsandbytes' quantised weights are not sharded"),
    ],
)
def test_train_mistakes_give_one_line_and_exit_1(tmp_path, capsys, settings, message):
    code = main(["train", bad_train_config(tmp_path, **settings)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert message in err, err


def test_data_command_summarises_and_shows(tmp_path, capsys):
    path = bad_train_config(tmp_path, template="chatml")
    assert main(["data", path, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "rows read: 1 (1 instruction)" in out and "padding if batches of" in out and "tokens per example:" in out
    assert "<|im_start|>assistant\n[[b<|im_end|>\n]]" in out


def test_lora_train_and_chat_never_import_bitsandbytes(tmp_path):
    # peft would import it (seconds of start-up) though only quantised bases and the 8-bit optimizer use it
    path = bad_train_config(tmp_path, method="lora", max_steps=2)
    for command in (["train", path], ["chat", str(tmp_path / "run"), "--prompt", "a", "--max-new-tokens", "2"]):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "lmtune", *command], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
        assert "peft" in imported
        # a blocked `import bitsandbytes` still shows as one empty line; a real one loads its submodules
        assert not any(name.startswith("bitsandbytes.") for name in imported), command[0]
        assert "scipy.optimize" not in imported, command[0]  # transformers' detection losses would import it


def test_scipy_is_hidden_only_while_transformers_modeling_imports(tmp_path):
    code = (
        "import sys\n"
        "from lmtune.model.unused_imports import import_modeling_without_scipy\n"
        "import_modeling_without_scipy()\n"
        "assert 'transformers.modeling_utils' in sys.modules and 'scipy' not in sys.modules\n"
        "import scipy.optimize\n"  # a reward function's own import still works
        "from transformers.utils.import_utils import is_scipy_available\n"
        "assert is_scipy_available()\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


def test_hiding_bitsandbytes_is_refused_to_a_later_quantised_run(tmp_path):
    code = (
        "import sys\n"
        "from lmtune.config.load import resolve\n"
        "from lmtune.errors import UserError\n"
        "from lmtune.model.unused_imports import skip_bitsandbytes_unless_needed\n"
        "def config(**extra):\n"
        "    return resolve(data={'base_model': 'builtin:tiny', 'dataset': 'd.jsonl', **extra}).config\n"
        "skip_bitsandbytes_unless_needed(config(method='qlora'))\n"
        "assert 'bitsandbytes' not in sys.modules\n"
        "skip_bitsandbytes_unless_needed(config(method='lora'))\n"
        "assert sys.modules['bitsandbytes'] is None\n"
        "try:\n"
        "    skip_bitsandbytes_unless_needed(config(optimizer='adamw_8bit'))\n"
        "except UserError as exc:\n"
        "    print('refused:', exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "refused: this process already ran a configuration without bitsandbytes" in run.stdout
