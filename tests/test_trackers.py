"""report_to wandb, mlflow and stdout: the config and the same losses as metrics.jsonl, read back with each library."""

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.engine.report import read_metrics
from test_train import make_config, run


def wandb_records(run_dir: Path) -> list:
    """The records of an offline wandb run, parsed with wandb's own protobuf messages.

    The .wandb file is a LevelDB-style log (32 KiB blocks, 7-byte record headers)
    after a 7-byte file header; wandb 0.2x+ ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            break
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_wandb_mlflow_and_stdout_record_the_config_and_the_logged_losses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x asks for this before it uses a folder store
    store = (tmp_path / "mlruns").as_uri()
    path = make_config(tmp_path, method="lora", max_steps=5, report_to=["wandb", "mlflow", "stdout"], mlflow_tracking_uri=store,
                       mlflow_experiment_name="trials", run_name="first", validation_split_ratio=0.25, eval_strategy="steps", eval_steps=2)
    result = run(path)
    logged = read_metrics(result.run_dir / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in logged if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in logged if "eval_loss" in r}
    assert len(train) == 5 and evals

    # wandb: the run's config, every logged loss at its step, the final model's path in the summary
    records = wandb_records(result.run_dir)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert config["learning_rate"] == 5e-3 and config["method"] == "lora" and start.display_name == "first"
    history = [{item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert {h["_step"]: h["loss"] for h in history if "loss" in h} == train
    assert {h["_step"]: h["eval_loss"] for h in history if "eval_loss" in h} == evals
    summary = [json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update
               if u.key == "final_model"]
    assert summary == [str(result.final_dir)]

    # mlflow: parameters, the same metric history, the final model as a tag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("trials")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "first" and found.info.status == "FINISHED"
    assert found.data.params["learning_rate"] == "0.005" and found.data.params["method"] == "lora"
    assert {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")} == train
    assert {m.step: m.value for m in client.get_metric_history(found.info.run_id, "eval_loss")} == evals
    assert found.data.tags["final_model"] == str(result.final_dir)

    # stdout: one name=value line per metric
    lines = capsys.readouterr().out.splitlines()
    assert [float(line.split("=")[1]) for line in lines if line.startswith("train_loss=")] == pytest.approx(list(train.values()), rel=1e-5)
    assert any(line.startswith("eval_loss=") for line in lines) and f"final_model={result.final_dir}" in lines


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    path = make_config(tmp_path, report_to=["wandb"], mlflow_tracking_uri="file:./mlruns")
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "error: report_to: wandb is not installed; pip install 'lmtune[wandb]'" in out
    assert "error: mlflow_tracking_uri: mlflow is not installed; pip install 'lmtune[mlflow]'" in out


def test_axolotl_tracker_keys_turn_the_trackers_on(tmp_path):
    from lmtune.config import load_config
    from lmtune.engine.trackers import wanted

    path = make_config(tmp_path, wandb_project="team-runs", wandb_name="try-3", mlflow_tracking_uri="file:./mlruns")
    config = load_config(path)
    assert wanted(config) == ["wandb", "mlflow"] and config.output.run_name == "try-3"
