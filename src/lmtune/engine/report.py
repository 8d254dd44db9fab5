"""What a run leaves for its user: metrics.jsonl, TensorBoard, the loss-curve picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl; mirrors to TensorBoard when asked and installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        self.note: Optional[str] = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.note = "report_to: tensorboard is not installed (pip install 'lmtune[tensorboard]'); metrics.jsonl only"

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
