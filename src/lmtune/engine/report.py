"""What a run leaves for its user: metrics.jsonl, TensorBoard, the loss-curve picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, and passes each to the run's trackers
    (engine/trackers.py). Only the main process writes."""

    def __init__(self, run_dir: Path, config: Any = None, enabled: bool = True, resumed: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: list[Any] = []
        self.notes: list[str] = []
        if enabled and config is not None:
            from .trackers import open_trackers

            self.trackers, self.notes = open_trackers(config, run_dir, resumed)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, final_model: Optional[Path] = None) -> None:
        for tracker in self.trackers:
            tracker.close(final_model)
        self.trackers = []


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, target: Path) -> Optional[str]:
    """Train and eval loss against steps as a PNG; returns a note when it cannot draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no loss plot: matplotlib is not installed (pip install 'lmtune[plots]')"
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return "no loss plot: nothing was logged"
    target.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        axis.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats per trained token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(target)
    plt.close(figure)
    return None
