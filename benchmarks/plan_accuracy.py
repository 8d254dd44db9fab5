"""How close `lmtune plan` comes to the memory and the time a run really takes, on this machine's CPU.

    python benchmarks/plan_accuracy.py     # writes the plan section of RESULTS.md

Each configuration (full / lora / qlora x two sequence lengths) trains a few
steps of the ~30M-parameter benchmark model in a fresh `lmtune train` process
on text long enough that every example is max_input_length tokens (plan's
bound). The measured peak is that process's maximum resident set size; the
prediction is `plan`'s peak per device for `--gpu cpu`, from config.json alone.
Time: the median tokens/s of the steps after the first (metrics.jsonl) against
plan's tokens/s; the builtin tiny and small models (the tests' and the
quickstart's), where fixed per-pass costs outweigh the matrix products, are
timed too.
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
SMALL = [("builtin:tiny", "full", 64), ("builtin:small", "full", 64), ("builtin:small", "lora", 256)]  # timed only
TOLERANCE = 0.20
TIME_TOLERANCE = 0.30


def build_text(path: Path, rows: int = 64) -> None:
    rng = random.Random(1)
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": sentence(rng, 1400)}) + "\n")


def config_for(method: str, length: int, model: Path, data: Path, out: Path) -> dict:
    values = {
        "base_model": str(model), "stage": "pt", "method": method, "dataset": str(data), "max_input_length": length,
        "truncation": "truncate_end", "micro_batch_size": 4, "max_steps": 6, "learning_rate": 1e-4, "logging_steps": 1,
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


def measured_tokens_per_second(run_dir: Path) -> float:
    speeds = [json.loads(line).get("tokens_per_second") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(s for s in speeds[1:] if s)  # the first step pays for warm-up
    return speeds[len(speeds) // 2]


def predicted(config_path: Path):
    from lmtune.config import load_config
    from lmtune.plan import make_plan

    return make_plan(load_config(config_path), device="cpu", devices=1, memory_gib=1024)


def main() -> None:
    model, work = WORK / "model-30m", WORK / "plan"
    build_model(model)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "text.jsonl"
    build_text(data)
    rows, timed = [], []
    jobs = [(str(model), method, length) for method, length in CONFIGS] + SMALL
    for base, method, length in jobs:
        name = f"{Path(base).name.replace('builtin:', '')}-{method}-{length}"
        path, out = work / f"{name}.json", work / f"run-{name}"
        values = config_for(method, length, model, data, out)
        values["base_model"] = base
        path.write_text(json.dumps(values))
        measured = measured_peak_bytes(path)
        plan = predicted(path)
        speed = measured_tokens_per_second(out)
        timed.append((base if base.startswith("builtin:") else "30M", method, length, plan.tokens_per_second, speed))
        if not base.startswith("builtin:"):
            rows.append((method, length, plan.peak_bytes, measured))
        print(f"{name:24s} plan {plan.peak_bytes / 2**20:7.0f} MiB measured {measured / 2**20:7.0f} MiB; "
              f"plan {plan.tokens_per_second:8.0f} tok/s measured {speed:8.0f} tok/s", flush=True)
    within = sum(abs(p / m - 1) <= TOLERANCE for _, _, p, m in rows)
    on_time = sum(abs(m / p - 1) <= TIME_TOLERANCE for *_, p, m in timed)
    from lmtune.plan import cpu_peak_tflops

    lines = [
        "## `lmtune plan` against measured memory and time (CPU)",
        "",
        f"Machine: {machine()}. Written by `python benchmarks/plan_accuracy.py`: each row trains 6 steps of the ~30M-parameter",
        "benchmark model (micro batch 4, every example at max_input_length) in a fresh process; measured = that process's",
        "peak resident set size, plan = `lmtune plan --gpu cpu`'s peak per device from config.json alone.",
        "",
        "| method | tokens per example | plan (MiB) | measured (MiB) | plan / measured |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {n} | {p / 2**20:,.0f} | {r / 2**20:,.0f} | {p / r:.2f} |" for m, n, p, r in rows]
    lines += ["", f"{within} of {len(rows)} predictions within {TOLERANCE:.0%} of the measured peak.", "",
              f"Time: plan's tokens/s (this CPU's fp32 matmul peak measured by plan: {cpu_peak_tflops():.3f} TFLOP/s) against the "
              "median tokens/s of steps 2-6; a run's time is its tokens over that speed.", "",
              "| model | method | tokens per example | plan (tokens/s) | measured (tokens/s) | plan time / measured time |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {b} | {m} | {n} | {p:,.0f} | {r:,.0f} | {r / p:.2f} |" for b, m, n, p, r in timed]
    lines += ["", f"{on_time} of {len(timed)} time estimates within {TIME_TOLERANCE:.0%} of the measured time."]
    write_section("plan", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
