"""Experiment trackers a run reports to besides metrics.jsonl: TensorBoard, wandb, mlflow, stdout lines.

Each is imported only when the config names it; a missing package is a one-line
error naming the extra that installs it. Every tracker receives the resolved
config as the run's parameters, each record as it is logged, and at the end the
final model's path.
"""

from __future__ import annotations

import importlib
import json
import uuid
from pathlib import Path
from typing import Any, Optional

from ..config.schema import Config
from ..errors import UserError


class TrackerError(UserError, ImportError):
    """A tracker the config names that cannot start: its package is missing, or it refuses the store."""


EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def wanted(config: Config) -> list[str]:
    """The trackers of this config: report_to's, plus wandb/mlflow when their project or store is set (as Axolotl does)."""
    o = config.output
    names = [t for t in o.report_to if t not in ("none", "jsonl")]
    if o.wandb_project and "wandb" not in names:
        names.append("wandb")
    if o.mlflow_tracking_uri and "mlflow" not in names:
        names.append("mlflow")
    return names


def _require(module: str, tracker: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(
            f"report_to: {tracker} is not installed; pip install 'lmtune[{EXTRAS[tracker]}]', or remove {tracker} from report_to"
        ) from None


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, config: Config, run_dir: Path):
        tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tensorboard.SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config.flat(), indent=1, default=str) + "\n```")

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self, final_model: Optional[Path]) -> None:
        if final_model is not None:
            self.writer.add_text("final_model", str(final_model))
        self.writer.close()


class Wandb:
    """One wandb run per lmtune run; a resumed lmtune run continues the same wandb run (its id is kept in the run folder)."""

    def __init__(self, config: Config, run_dir: Path, resumed: bool):
        wandb = _require("wandb", "wandb")
        o = config.output
        id_file = run_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=o.wandb_project or "lmtune",
            entity=o.wandb_entity,
            name=o.run_name or run_dir.resolve().name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config.flat(),
            reinit="finish_previous",
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_numbers(record), step=int(record["step"]))

    def close(self, final_model: Optional[Path]) -> None:
        if final_model is not None:
            self.run.summary["final_model"] = str(final_model)
        self.run.finish()


class MLflow:
    """Through MlflowClient, so no global active run is left behind in the process."""

    def __init__(self, config: Config, run_dir: Path, resumed: bool):
        _require("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from mlflow.exceptions import MlflowException

        o = config.output
        self.client = MlflowClient(tracking_uri=o.mlflow_tracking_uri)
        name = o.mlflow_experiment_name or "lmtune"
        try:
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        except MlflowException as exc:  # a store MLflow refuses (newer versions refuse file stores unless allowed)
            raise TrackerError(f"mlflow_tracking_uri: {str(exc).splitlines()[0]}") from None
        id_file = run_dir / "mlflow-run-id"
        if resumed and id_file.exists():
            self.run_id = id_file.read_text().strip()
            return
        run = self.client.create_run(experiment_id, run_name=o.run_name or run_dir.resolve().name)
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, json.dumps(v, default=str)[:500] if not isinstance(v, str) else v[:500]) for k, v in config.flat().items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log(self, record: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(record["step"])) for k, v in _numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, final_model: Optional[Path]) -> None:
        if final_model is not None:
            self.client.set_tag(self.run_id, "final_model", str(final_model))
        self.client.set_terminated(self.run_id)


class Stdout:
    """One `name=value` line per metric: what SageMaker metric definitions (regexes over the log) read.
    Training metrics are named train_*, evaluation ones keep their eval_ prefix."""

    def log(self, record: dict[str, Any]) -> None:
        lines = [f"step={int(record['step'])}"]
        for key, value in _numbers(record).items():
            lines.append(f"{key if key.startswith('eval_') or key == 'epoch' else 'train_' + key}={value:.6g}")
        print("\n".join(lines), flush=True)

    def close(self, final_model: Optional[Path]) -> None:
        if final_model is not None:
            print(f"final_model={final_model}", flush=True)


def open_trackers(config: Config, run_dir: Path, resumed: bool) -> tuple[list[Any], list[str]]:
    """(the trackers, notes for the user). TensorBoard missing is a note (metrics.jsonl holds the same numbers);
    a missing wandb or mlflow is an error, as `check` says before the run."""
    out: list[Any] = []
    notes: list[str] = []
    for name in wanted(config):
        if name == "tensorboard":
            try:
                out.append(TensorBoard(config, run_dir))
            except TrackerError:
                notes.append("report_to: tensorboard is not installed (pip install 'lmtune[tensorboard]'); metrics.jsonl only")
        elif name == "wandb":
            out.append(Wandb(config, run_dir, resumed))
        elif name == "mlflow":
            out.append(MLflow(config, run_dir, resumed))
        elif name == "stdout":
            out.append(Stdout())
    return out, notes
