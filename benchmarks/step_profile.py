"""Where lmtune's training step spends its time, and how much faster it could get on this machine.

    python benchmarks/step_profile.py      # writes the profile section of RESULTS.md (about 3 minutes)

Each job of benchmarks/run.py trains with lmtune's defaults through `train()`; after two
warm-up steps, torch.profiler records the next six optimizer steps. Every operator's own
time falls into one of four parts: matrix products (and the FLOP/s they reach: their FLOPs
counted in a second run of the same steps), attention (SDPA's kernels), the optimizer with gradient clipping, and the rest
(norms, rotary, activations, residual additions, the loss: elementwise passes over memory).
Ceilings: the tokens/s if the parts other than matrix products took no time at all, and
if only the rest took none. (No ratios to run.py's baseline: that ran in another process at another time,
and a ratio here must come from one run.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402
from run import WORK, build_data, build_model, lmtune_config, machine, matmul_peak_gflops  # noqa: E402

JOBS = ("sft_lora", "sft_full", "pt")
WARMUP, PROFILED = 2, 6
MATMULS = ("mm", "addmm", "bmm", "baddbmm")  # aten operators; the add- forms take (bias, a, b)


def part_of(name: str) -> str:
    if name.removeprefix("aten::") in MATMULS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "adam" in name or name.startswith("aten::_foreach"):
        return "optimizer"
    return "rest"


def matmul_counter() -> Any:
    """A dispatch mode adding up the FLOPs of every matrix product run under it (backward included).
    torch's FlopCounterMode tracks modules with hooks that fail inside a nested autograd.grad (lean_mlp)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulFlops(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in MATMULS:
                a, b = (args[1], args[2]) if "add" in name else (args[0], args[1])
                self.flops += 2 * a.numel() * b.shape[-1]
            return func(*args, **(kwargs or {}))

    return MatmulFlops()


def over_steps(job: str, model: Path, data: Path, begin: Callable[[], None], end: Callable[[], None], **changes: Any) -> float:
    """Train the job's first steps with lmtune's defaults (and the config `changes`); `begin` after the warm-up
    steps, `end` after the profiled ones. Returns the profiled steps' real tokens per second."""
    from lmtune.config.load import resolve
    from lmtune.engine.loop import train

    out = WORK / "runs" / f"profile-{job}"
    resolved = resolve(data={**lmtune_config(job, model, data, out, epochs=1.0, max_steps=WARMUP + PROFILED), **changes})
    assert resolved.config is not None, resolved.errors
    marks: dict = {}

    def on_step(state) -> None:
        if state.global_step == WARMUP:
            marks["tokens"], marks["start"] = state.real_tokens, time.perf_counter()
            begin()
        elif state.global_step == WARMUP + PROFILED:
            end()
            marks["tokens"], marks["seconds"] = state.real_tokens - marks["tokens"], time.perf_counter() - marks["start"]

    train(resolved.config, quiet=True, on_step=on_step)
    return marks["tokens"] / marks["seconds"]


def profile_job(job: str, model: Path, data: Path) -> dict:
    """Two runs of the same steps (same seed, same batches): one timed by torch.profiler, one whose matrix
    products are counted. Recording shapes in the timed run would make its elementwise operators look
    3-4x slower than they are (measured on the pt job), so the FLOPs come from the second run."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU])
    rate = over_steps(job, model, data, profiler.start, profiler.stop)
    seconds = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "rest": 0.0}
    for event in profiler.key_averages():
        seconds[part_of(event.key)] += event.self_cpu_time_total / 1e6
    counter = matmul_counter()
    over_steps(job, model, data, counter.__enter__, lambda: counter.__exit__(None, None, None))
    flops = counter.flops
    total = sum(seconds.values())
    return {
        "shares": {part: value / total for part, value in seconds.items()},
        "matmul_gflops": flops / max(seconds["matmul"], 1e-9) / 1e9,
        "tokens_per_s": rate,  # while profiled: a little below the unprofiled rate
    }


def main() -> None:
    model, data = WORK / "model-30m", WORK / "data-128"
    build_model(model)
    build_data(data, 128)
    peak = matmul_peak_gflops()
    rows = []
    for job in JOBS:
        rows.append((job, profile_job(job, model, data)))
        print(job, json.dumps(rows[-1][1]), flush=True)

    lines = [
        "## Where a training step's time goes (lmtune, CPU)",
        "",
        f"Machine: {machine()}; fp32 matmul peak {peak:.1f} GFLOP/s (2048x2048 products, all threads), measured in the same run.",
        f"Written by `python benchmarks/step_profile.py`: torch.profiler over {PROFILED} optimizer steps of each job of `run.py`",
        f"(after {WARMUP} warm-up steps) with lmtune's defaults; each operator's own time counted in one part. `rest`: norms,",
        "rotary embeddings, activations, residual additions, the loss: elementwise passes over memory. Tokens/s are the",
        "profiled steps' (a little below unprofiled); the two ceilings are the tokens/s if every part but the matrix",
        "products took no time, and if only `rest` took none. The profiler inflates elementwise operators inside training",
        "(`rest` above all): the next section measures the parts without it.",
        "",
        "| job | tok/s | matmul | matmul GFLOP/s (of peak) | attention | optimizer + clipping | rest | ceiling: matmul alone | ceiling: no `rest` |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for job, found in rows:
        s, tokens_per_s = found["shares"], found["tokens_per_s"]
        lines.append(
            f"| {job} | {tokens_per_s:,.0f} | {s['matmul']:.0%} | {found['matmul_gflops']:.0f} ({found['matmul_gflops'] / peak:.0%}) "
            f"| {s['attention']:.0%} | {s['optimizer']:.0%} | {s['rest']:.0%} | {tokens_per_s / s['matmul']:,.0f} "
            f"| {tokens_per_s / (1 - s['rest']):,.0f} |"
        )
    write_section("profile", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
