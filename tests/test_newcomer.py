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


def test_export_merge_of_an_rm_run_keeps_the_reward_head_and_score_reads_it(tmp_path, capsys):
    from test_alignment import preference_rows, run_config

    from lmtune.engine.loop import train

    result = train(run_config(tmp_path, "rm", "lora", max_steps=2, validation_split_ratio=0.0), quiet=True)
    assert main(["score", str(result.run_dir), "--prompt", "Say thanks.", "--answer", "the thanks"]) == 0
    adapter_score = float(capsys.readouterr().out.split()[-1])
    out = tmp_path / "merged"
    assert main(["export", str(result.run_dir), "--merge", "--dtype", "fp32", "--out", str(out)]) == 0
    assert "reward model (AutoModelForSequenceClassification, one output)" in capsys.readouterr().out
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).architectures == ["LlamaForSequenceClassification"]
    assert main(["score", str(out), "--prompt", "Say thanks.", "--answer", "the thanks"]) == 0
    assert abs(float(capsys.readouterr().out.split()[-1]) - adapter_score) < 1e-3  # the same reward, merged
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": r["prompt"], "input": "", "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n"
                            for r in preference_rows(3)))
    assert main(["score", str(out), "--file", str(rows)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.count("reward_chosen") == 3


def test_score_on_a_policy_run_and_chat_on_pickle_weights_answer_in_one_line(tmp_path, capsys):
    from test_train import make_config, run

    result = run(make_config(tmp_path, method="lora", max_steps=2))
    assert main(["score", str(result.run_dir), "--text", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "was trained with stage: sft; score reads reward models" in err
    folder = tmp_path / "pickled"
    folder.mkdir()
    from lmtune.model.builtin import builtin_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    model = AutoModelForCausalLM.from_pretrained(builtin_path("builtin:tiny"))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # pickle weights only, as older checkpoints ship
    AutoTokenizer.from_pretrained(builtin_path("builtin:tiny")).save_pretrained(folder)
    assert main(["chat", str(folder), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "its weights are not in safetensors" in err


def test_chat_prompts_read_backslash_n_as_a_newline():
    from lmtune.cli import with_escapes

    assert with_escapes("Reverse the list.\\n\\n1 2 3") == "Reverse the list.\n\n1 2 3"
    assert with_escapes("no escapes: é") == "no escapes: é"


def test_plan_takes_current_cards_and_an_8bit_config_without_bitsandbytes(tmp_path, capsys, monkeypatch):
    from lmtune.config import rules

    monkeypatch.setattr(rules, "installed", lambda module: module != "bitsandbytes")  # a fresh install without the quant extra
    config = tmp_path / "c.yaml"
    config.write_text("base_model: builtin:tiny\nmethod: lora\nint8_quantization: true\n")
    assert main(["check", str(config)]) == 1
    assert "error: int8_quantization: quantised bases need bitsandbytes" in capsys.readouterr().out
    for card in ("h200", "h100-nvl", "b200", "l40s", "rtx-4090", "rtx-5090", "mi300x"):
        assert main(["plan", str(config), "--gpu", card]) == 0, card
        captured = capsys.readouterr()
        assert "int8_quantization: quantised bases need bitsandbytes" in captured.err and "plan reads config.json only" in captured.err
