"""How close `lmtune plan` comes to the memory a run really takes, on this machine's CPU.

    python benchmarks/plan_accuracy.py     # 6 configurations, writes the plan section of RESULTS.md

Each configuration (full / lora / qlora x two sequence lengths) trains a few
steps of the ~30M-parameter benchmark model in a fresh `lmtune train` process
on text long enough that every example is max_input_length tokens (plan's
bound). The measured peak is that process's maximum resident set size; the
prediction is `plan`'s peak per device for `--gpu cpu`, from config.json alone.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402
from run import WORK, build_model, machine, sentence  # noqa: E402

CONFIGS = [(method, length) for method in ("full", "lora", "qlora") for length in (256, 1024)]
TOLERANCE = 0.20


def build_text(path: Path, rows: int = 64) -> None:
    rng = random.Random(1)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": sentence(rng, 1400)}) + "\n")


def config_for(method: str, length: int, model: Path, data: Path, out: Path) -> dict:
    values = {
        "base_model": str(model), "stage": "pt", "method": method, "dataset": str(data), "max_input_length": length,
        "truncation": "truncate_end", "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-4, "logging_steps": 1,
        "output_dir": str(out), "overwrite_output_dir": True, "cache_dir": str(out.parent / "cache"), "plot_loss": False,
    }
    if method != "full":
        values.update(lora_r=16, lora_alpha=32, lora_target=["all"], lora_dropout=float(os.environ.get("DROP", "0.05")))
    return values


def measured_peak_bytes(config_path: Path) -> int:
    """The child's own maximum resident set size (wait4 reports it per child)."""
    child = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(config_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{config_path}: training failed\n{child.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def predicted_peak_bytes(config_path: Path) -> float:
    from lmtune.config import load_config
    from lmtune.plan import make_plan

    return make_plan(load_config(config_path), device="cpu", devices=1, memory_gib=1024).peak_bytes


def main() -> None:
    model, work = WORK / "model-30m", WORK / "plan"
    build_model(model)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "text.jsonl"
    build_text(data)
    rows = []
    for method, length in CONFIGS:
        path = work / f"{method}-{length}.json"
        path.write_text(json.dumps(config_for(method, length, model, data, work / f"run-{method}-{length}")))
        measured, predicted = measured_peak_bytes(path), predicted_peak_bytes(path)
        rows.append((method, length, predicted, measured))
        print(f"{method:6s} {length:5d}  plan {predicted / 2**20:7.0f} MiB  measured {measured / 2**20:7.0f} MiB  ratio {predicted / measured:.2f}",
              flush=True)
    within = sum(abs(p / m - 1) <= TOLERANCE for _, _, p, m in rows)
    lines = [
        "## `lmtune plan` against measured memory (CPU)",
        "",
        f"Machine: {machine()}. Written by `python benchmarks/plan_accuracy.py`: each row trains 3 steps of the ~30M-parameter",
        "benchmark model (micro batch 4, every example at max_input_length) in a fresh process; measured = that process's",
        "peak resident set size, plan = `lmtune plan --gpu cpu`'s peak per device from config.json alone.",
        "",
        "| method | tokens per example | plan (MiB) | measured (MiB) | plan / measured |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {n} | {p / 2**20:,.0f} | {r / 2**20:,.0f} | {p / r:.2f} |" for m, n, p, r in rows]
    lines += ["", f"{within} of {len(rows)} predictions within {TOLERANCE:.0%} of the measured peak."]
    write_section("plan", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
