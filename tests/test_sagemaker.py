"""The SageMaker entry point, run by the real SageMaker training toolkit (`sagemaker-training`'s `train`).

The toolkit reads the job's tree from $SAGEMAKER_BASE_DIR, resolves the hosts of
resourceconfig.json, and starts our one-line script with the hyperparameters as
--flags and as JSON-decoded SM_HPS, exactly as in a training container.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import COMPAT
from lmtune.engine.report import read_metrics

# SageMaker JumpStart's default fine-tuning hyperparameters for Llama models, as the strings a job receives.
JUMPSTART_DEFAULTS = {
    "int8_quantization": "False",
    "enable_fsdp": "True",
    "epoch": "5",
    "learning_rate": "0.0001",
    "lora_r": "8",
    "lora_alpha": "32",
    "lora_dropout": "0.05",
    "instruction_tuned": "False",
    "chat_dataset": "True",
    "add_input_output_demarcation_key": "True",
    "per_device_train_batch_size": "1",
    "per_device_eval_batch_size": "1",
    "max_train_samples": "-1",
    "max_val_samples": "-1",
    "seed": "10",
    "max_input_length": "-1",
    "validation_split_ratio": "0.2",
    "train_data_split_seed": "0",
    "preprocessing_num_workers": "None",
}
TOOLKIT = Path(sys.executable).parent / "train"


def instruction_rows(n=40):
    return [{"instruction": f"Name the colour of item {i % 5}.", "context": f"Item {i % 5} is painted {['red', 'blue', 'green', 'gold', 'grey'][i % 5]}.",
             "response": ["red", "blue", "green", "gold", "grey"][i % 5]} for i in range(n)]


def job_tree(tmp_path: Path, tiny_dir: Path, hyperparameters: dict) -> Path:
    base = tmp_path / "opt" / "ml"
    config = base / "input" / "config"
    config.mkdir(parents=True)
    # As the SageMaker SDK sends them: the script and its source folder ride along as reserved hyperparameters.
    reserved = {"sagemaker_program": "entry.py", "sagemaker_submit_directory": str(tmp_path / "code")}
    (config / "hyperparameters.json").write_text(json.dumps({**reserved, **hyperparameters}))
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "localhost", "hosts": ["localhost"], "network_interface_name": "lo"}))
    (config / "inputdataconfig.json").write_text(json.dumps({name: {"ContentType": "application/jsonlines", "TrainingInputMode": "File"}
                                                             for name in ("train", "model")}))
    train = base / "input" / "data" / "train"
    train.mkdir(parents=True)
    (train / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instruction_rows()))
    shutil.copy(COMPAT / "sagemaker" / "template.json", train / "template.json")
    shutil.copytree(tiny_dir, base / "input" / "data" / "model")
    code = tmp_path / "code"
    code.mkdir()
    (code / "entry.py").write_text("from lmtune.sagemaker import main; raise SystemExit(main())\n")
    return base


def toolkit_env(base: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_"))}
    env.update(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_PROGRAM="entry.py", SAGEMAKER_SUBMIT_DIRECTORY=str(base.parents[1] / "code"),
               PYTHONUNBUFFERED="1")
    return env


def run_toolkit(base: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(TOOLKIT)], env=toolkit_env(base), capture_output=True, text=True, timeout=600)


def jumpstart(**changes) -> dict:
    return {**JUMPSTART_DEFAULTS, "instruction_tuned": "True", "chat_dataset": "False", "epoch": "1",
            "sagemaker_container_log_level": "20", **changes}


def test_jumpstart_job_through_the_toolkit_leaves_a_model_that_loads_in_plain_transformers(tmp_path, tiny_dir):
    base = job_tree(tmp_path, tiny_dir, jumpstart(learning_rate="0.002", sagemaker_container_log_level="10"))
    done = run_toolkit(base)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert not (base / "output" / "failure").exists()
    assert "enable_fsdp: one process: nothing to shard" in log  # JumpStart's default, trained in one process
    # debug level: lmtune's lines, not the libraries' debug and info output
    assert "Model config LlamaConfig" not in log and "Attempting to acquire lock" not in log and "loading configuration file" not in log
    # CloudWatch metric lines
    losses = [float(line.split("=", 1)[1]) for line in done.stdout.splitlines() if line.startswith("train_loss=")]
    metrics = read_metrics(base / "output" / "data" / "metrics.jsonl")
    assert losses == pytest.approx([r["loss"] for r in metrics if "loss" in r], rel=1e-5) and len(losses) >= 3
    assert any(line.startswith("eval_loss=") for line in done.stdout.splitlines())
    assert (base / "output" / "data" / "summary.json").exists() and (base / "output" / "data" / "plots" / "loss.png").exists()

    # The merged model (as JumpStart leaves it) loads and generates with plain transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = base / "model"
    assert not (model_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        out = model.generate(**tokenizer("Name the colour", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


def test_adapter_only_when_asked_loads_in_plain_peft(tmp_path, tiny_dir):
    base = job_tree(tmp_path, tiny_dir, jumpstart(merge_adapter="False", max_train_samples="8", validation_split_ratio="0"))
    done = run_toolkit(base)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (base / "model" / "adapter_config.json").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), base / "model")


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"lora_rnak": "8"}, "lora_rnak: unknown setting"),
        ({"base_model": "/nowhere/model"}, "base_model"),
    ],
)
def test_a_broken_job_leaves_a_readable_failure_file(tmp_path, tiny_dir, change, reason):
    base = job_tree(tmp_path, tiny_dir, jumpstart(**change))
    done = run_toolkit(base)
    assert done.returncode != 0
    failure = (base / "output" / "failure").read_text()
    assert reason in failure and len(failure.strip().splitlines()) == 1, failure
    assert "Traceback" not in done.stderr.split("ExecuteUserScriptError")[0], done.stderr[-2000:]


def test_no_train_channel_is_named(tmp_path, tiny_dir):
    base = job_tree(tmp_path, tiny_dir, jumpstart())
    shutil.rmtree(base / "input" / "data" / "train")
    done = run_toolkit(base)
    assert done.returncode != 0
    assert "no train channel" in (base / "output" / "failure").read_text()


def test_a_restarted_job_resumes_from_the_checkpoints_it_finds(tmp_path, tiny_dir):
    hyperparameters = jumpstart(epoch="3", save_steps="4", validation_split_ratio="0", logging_steps="1", lr_scheduler="constant")
    base = job_tree(tmp_path, tiny_dir, hyperparameters)
    # The first job is stopped (as a spot interruption would) once it has written checkpoints.
    first = subprocess.Popen([str(TOOLKIT)], env=toolkit_env(base), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    checkpoints = base / "checkpoints" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if len(list(checkpoints.glob("checkpoint-*/state.json"))) >= 2:
            os.killpg(first.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait(timeout=60)
    assert first.returncode != 0, "the first job ended before it could be stopped"
    assert not (base / "model" / "config.json").exists()

    second = run_toolkit(base)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resuming from checkpoint-" in second.stdout
    steps = [r["step"] for r in read_metrics(base / "output" / "data" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 3 * 40 + 1))  # every step logged once: 40 training rows, 3 epochs, batch 1
    assert (base / "model" / "config.json").exists()


def test_python_dash_m_and_the_cli_take_flags_over_the_file(tmp_path, tiny_dir, monkeypatch):
    from lmtune.sagemaker import Job, hyperparameters

    base = job_tree(tmp_path, tiny_dir, {"epoch": "\"3\"", "lora_r": "8"})
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(base))
    monkeypatch.setenv("SM_HPS", json.dumps({"epoch": 2, "seed": 4}))
    values = hyperparameters(Job.from_environment(), ["--epoch", "1", "--lora_r=16", "--instruction_tuned"])
    assert values == {"epoch": "1", "lora_r": "16", "seed": 4, "instruction_tuned": "True",
                      "sagemaker_program": "entry.py", "sagemaker_submit_directory": str(tmp_path / "code")}


def test_two_hosts_train_as_one_job_through_the_distributed_launch(tmp_path, tiny_dir):
    """SM_HOSTS names two hosts (both this machine): each host's entry point launches its process, they meet at
    the first host in sorted order, and the main process alone writes the model and the records."""
    base = job_tree(tmp_path, tiny_dir, jumpstart(max_train_samples="12", validation_split_ratio="0", per_device_train_batch_size="2",
                                                 logging_steps="1"))
    hosts = ["127.0.0.1", "localhost"]
    common = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_"))}
    common.update(SAGEMAKER_BASE_DIR=str(base), SM_HOSTS=json.dumps(hosts), SM_NUM_GPUS="0", PYTHONUNBUFFERED="1")
    workers = [subprocess.Popen([sys.executable, "-m", "lmtune.sagemaker"], env={**common, "SM_CURRENT_HOST": host},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for host in hosts]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    # JumpStart asks for enable_fsdp: with two processes the LoRA run is sharded
    assert "processes: 2, FSDP2 (full_shard) over gloo; global batch 2 x 1 accumulation x 2 processes = 4" in outputs[0][0]
    steps = [r["step"] for r in read_metrics(base / "output" / "data" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]  # 12 examples, 4 per global batch
    assert (base / "model" / "config.json").exists() and not (base / "output" / "failure").exists()
