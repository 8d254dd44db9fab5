"""What a newcomer trips on, found by `check` before any model loads (the audit of issue 23)."""

import json

from conftest import ROOT
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


def test_interactive_chat_takes_a_two_line_message_and_an_empty_line_does_not_end_it(tmp_path, capsys, monkeypatch):
    from test_train import make_config, run

    import lmtune.generate as generate

    result = run(make_config(tmp_path, method="lora", max_steps=1))
    seen = []
    monkeypatch.setattr(generate, "answer", lambda model, tokenizer, histories, *a, **k: seen.append(histories[0][-1]) or ["ok"])
    typed = iter(["Reverse the list.\\", "\\", "1 2 3", "", "/exit"])  # an empty line alone goes on, it does not end

    def fake_input(prompt=""):
        return next(typed)

    monkeypatch.setattr("builtins.input", fake_input)
    assert main(["chat", str(result.run_dir)]) == 0
    assert seen == [{"role": "user", "content": "Reverse the list.\n\n1 2 3"}]


def test_plan_on_a_cpu_counts_the_fixed_costs_of_each_pass(tmp_path, monkeypatch):
    """The audit's 60x: with the matrix products alone, a 2M-parameter model on a CPU would train 60 times faster
    than it does. However fast the matrix products, each micro batch costs its passes and layers."""
    from lmtune import plan as planning
    from lmtune.config.load import resolve

    monkeypatch.setattr(planning, "cpu_peak_tflops", lambda: 1e9)  # matrix products for free
    config = resolve(data={"base_model": "builtin:small", "method": "full", "micro_batch_size": 8, "max_input_length": 64,
                           "max_steps": 100}).config
    estimate = planning.make_plan(config, device="cpu")
    fixed = planning.CPU_PASS_S + planning.CPU_LAYER_S * 4
    assert estimate.tokens_per_second < 8 * 64 / fixed
    assert estimate.seconds > 100 * fixed


def test_plan_measures_this_cpu_once_and_keeps_the_fastest(tmp_path, monkeypatch):
    from lmtune import plan as planning

    monkeypatch.setenv("LMTUNE_HOME", str(tmp_path))
    first = planning.cpu_peak_tflops()
    assert first > 0
    saved = json.loads((tmp_path / "cpu-speed.json").read_text())
    key = next(k for k in saved if not k.endswith("measurements"))
    saved[key] = first * 1000  # as if an earlier, quieter measurement had been faster
    (tmp_path / "cpu-speed.json").write_text(json.dumps(saved))
    assert planning.cpu_peak_tflops() == first * 1000


def test_library_noise_is_quiet_in_eval_chat_and_export(tmp_path):
    import subprocess
    import sys

    from test_train import make_config

    config = make_config(tmp_path, method="lora", max_steps=2, validation_split_ratio=0.25)
    subprocess.run([sys.executable, "-m", "lmtune", "train", str(config)], check=True, capture_output=True)
    run_dir = tmp_path / "run"
    for argv in (["eval", str(config), "--checkpoint", str(run_dir)], ["chat", str(run_dir), "--prompt", "hi"],
                 ["export", str(run_dir), "--merge"]):
        done = subprocess.run([sys.executable, "-m", "lmtune", *argv], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr and "gemm_4bit" not in done.stderr, (argv, done.stderr)


def test_an_int8_run_does_not_repeat_the_cast_warning(tmp_path):
    import subprocess
    import sys

    import pytest

    pytest.importorskip("bitsandbytes")
    from test_train import make_config

    config = make_config(tmp_path, method="lora", int8_quantization=True, max_steps=3)
    done = subprocess.run([sys.executable, "-m", "lmtune", "train", str(config)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MatMul8bitLt" not in done.stderr


def test_features_other_tools_have_are_named_with_what_to_use_instead(tmp_path, capsys):
    for key, instead in (("use_dora", "use method: lora"), ("use_unsloth", "remove the key"),
                         ("tokens", "use a tokenizer that has them"), ("deepspeed", "enable_fsdp: true")):
        code, lines = check_lines(tmp_path, capsys, **{key: True})
        errors = [line for line in lines if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "lmtune does not have" in errors[0] and instead in errors[0], (key, errors)
        assert main(["explain", key]) == 1
        out = capsys.readouterr().out
        assert "lmtune does not have" in out and "not supported: " not in out


def test_a_two_process_refusal_is_said_once(tmp_path):
    import subprocess
    import sys

    from test_train import make_config

    config = make_config(tmp_path, method="full", enable_fsdp=True)  # every process finds nothing to resume
    done = subprocess.run([sys.executable, "-m", "lmtune", "train", str(config), "--nproc", "2", "--resume"],
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "holds no checkpoint" in errors[0], done.stderr[-3000:]


def test_the_progress_bar_keeps_the_training_loss_beside_the_eval_loss(tmp_path):
    from test_train import make_config, run

    import lmtune.engine.loop as loop

    shown = []
    real = loop.SharedLoop.evaluate_now

    def spy(self):
        stop = real(self)
        shown.append(dict(self.shown))
        return stop

    loop.SharedLoop.evaluate_now = spy
    try:
        result = run(make_config(tmp_path, method="lora", max_steps=6, validation_split_ratio=0.25, eval_strategy="steps",
                                 eval_steps=3))
    finally:
        loop.SharedLoop.evaluate_now = real
    assert shown and all({"loss", "eval", "tokens/s"} <= set(bar) for bar in shown), shown
    assert result.step_speed >= result.tokens_per_second  # the steps alone are faster than start to end


def test_the_readme_states_the_quickstart_time_as_measured_and_it_is_short():
    from pathlib import Path

    from lmtune.quickstart import config_text

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "measured" in first and "~2 minutes" not in first
    assert "epochs: 1\n" in config_text(Path("d.jsonl"), Path("run"))


def test_the_ppo_example_teaches_something_visible(tmp_path, monkeypatch):
    """examples/ppo_lora.yaml as shipped, on builtin:tiny: the mean reward of its last iterations is far above its
    first ones (cad22b0's example logged a reward of 0.0 in 19 of 20 iterations)."""
    from lmtune.config import load_config
    from lmtune.engine.loop import train
    from lmtune.engine.report import read_metrics

    monkeypatch.chdir(ROOT / "examples")
    config = load_config(ROOT / "examples" / "ppo_lora.yaml", [f"output_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c'}"])
    result = train(config, ROOT / "examples", quiet=True)
    rewards = [r["reward_mean"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward_mean" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 20 and last > 0.3 and last > 10 * first, rewards
