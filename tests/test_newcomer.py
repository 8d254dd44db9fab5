"""What a newcomer trips on, found by `check` before any model loads (the audit of issue 23)."""

import json

from lmtune.cli import main


def check_lines(tmp_path, capsys, **settings):
    values = {"base_model": "builtin:tiny", "dataset": str(tmp_path / "d.jsonl"), **settings}
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "hi", "output": "there"}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    code = main(["check", str(config)])
    return code, capsys.readouterr().out.splitlines()


def test_flash_attention_without_cuda_is_named_at_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, whatever machine runs this
    code, lines = check_lines(tmp_path, capsys, attn_implementation="flash_attention_2")
    assert any(l.startswith("warning: attn_implementation: flash_attention_2 needs a CUDA GPU and flash-attn, and no CUDA GPU "
                            "is visible here, so training on this machine refuses it") for l in lines), lines


def test_a_pickle_only_model_folder_is_refused_at_check(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    code, lines = check_lines(tmp_path, capsys, base_model=str(folder))
    assert code == 1
    assert any(l.startswith(f"error: base_model: {folder} holds only pickle weights (pytorch_model.bin)") for l in lines), lines
    code, lines = check_lines(tmp_path, capsys, base_model=str(folder), allow_pickle_weights=True)
    assert not any("pickle" in l for l in lines if l.startswith("error")), lines


def test_a_model_with_its_own_code_needs_trust_remote_code_at_check(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "modeling.M"}}))
    (folder / "model.safetensors").write_bytes(b"")
    code, lines = check_lines(tmp_path, capsys, base_model=str(folder))
    assert code == 1 and any(l.startswith(f"error: base_model: {folder} ships its own model code") for l in lines), lines
    code, lines = check_lines(tmp_path, capsys, base_model=str(folder), trust_remote_code=True)
    assert not any("ships its own" in l for l in lines), lines


def test_a_reward_function_that_is_not_python_is_refused_at_check(tmp_path, capsys):
    (tmp_path / "reward.txt").write_text("def f(prompts, answers):\n    return [1.0] * len(answers)\n")
    code, lines = check_lines(tmp_path, capsys, stage="ppo", reward_function=str(tmp_path / "reward.txt") + ":f")
    assert code == 1
    assert any("reward.txt is not a Python file; name a .py file and a function in it" in l for l in lines), lines


def test_tensorboard_not_installed_is_said_before_the_run(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, lines = check_lines(tmp_path, capsys, report_to=["tensorboard"])
    assert "warning: report_to: tensorboard is not installed, so this run writes metrics.jsonl only; pip install 'lmtune[tensorboard]'" in lines


def test_explain_into_a_closed_pipe_is_quiet():
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m lmtune explain --markdown | head -1", shell=True, capture_output=True, text=True)
    assert done.stdout.startswith("# ") and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
