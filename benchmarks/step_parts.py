"""What each part of lmtune's training step costs, measured by making it free.

    python benchmarks/step_parts.py      # writes the parts section of RESULTS.md (about 15 minutes)

torch.profiler inflates elementwise operators several-fold inside training (see step_profile.py), so its
shares say little about norms, rotary or dropout. Here each part is replaced by a stand-in that does next to
nothing, and the step is timed without any profiler: the part's share is the time that disappears. Each
job of benchmarks/run.py (lmtune's defaults) trains 2 warm-up steps and 6 timed ones per variant; the
variants alternate over 3 rounds and the medians are shown. Stand-ins (the losses are meaningless, the
shapes and the backward pass are kept):

- attention: each example's attention returns its values (copied out to every query head) instead;
- rotary: queries and keys pass through unrotated;
- norms: every RMS norm returns its input;
- LoRA dropout: `lora_dropout: 0` (the adapters' plain forward).

The norms' stand-in lets unnormalised values reach the layers above, which may run at another speed on
them: that column is the least certain. Shares within 2-3% either way are this machine's run-to-run noise.

What is left after these, and after the matrix products (whose time step_profile.py measures), is the rest:
residual additions, activations, the loss, the optimizer, the loop.
"""

from __future__ import annotations

import statistics
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402
from run import WORK, build_data, build_model, machine  # noqa: E402
from step_profile import JOBS, PROFILED, WARMUP, over_steps  # noqa: E402

ROUNDS = 5


def _values_for_every_head(query: Any, key: Any, value: Any, **_: Any) -> Any:
    repeats = query.shape[1] // value.shape[1]
    return (value.repeat_interleave(repeats, dim=1) if repeats > 1 else value) + 0 * query


class _Unrotated:
    @staticmethod
    def apply(x: Any, cos: Any, sin: Any) -> Any:
        return x


@contextmanager
def _replaced(module: Any, name: str, stand_in: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, stand_in)
    try:
        yield
    finally:
        setattr(module, name, original)


def stand_in(part: str, stack: ExitStack) -> dict:
    """Enter the part's stand-in on `stack`; returns config changes it needs."""
    import lmtune.model.packed_attention as packed
    import lmtune.model.rms_norm as rms_norm
    import lmtune.model.rotary as rotary

    if part == "attention":
        stack.enter_context(_replaced(packed, "_one_example", _values_for_every_head))
    elif part == "rotary":
        stack.enter_context(_replaced(rotary, "_Rotated", _Unrotated))
    elif part == "norms":
        stack.enter_context(_replaced(rms_norm, "_llama_forward", lambda self, x: x))
    elif part == "LoRA dropout":
        return {"lora_dropout": 0.0}
    return {}


def timed(job: str, model: Path, data: Path, part: str) -> float:
    with ExitStack() as stack:
        changes = stand_in(part, stack)
        return over_steps(job, model, data, lambda: None, lambda: None, **changes)


def main() -> None:
    model, data = WORK / "model-30m", WORK / "data-128"
    build_model(model)
    build_data(data, 128)
    lines = [
        "## What each part of a step costs: made free, one at a time (lmtune, CPU)",
        "",
        f"Machine: {machine()}. Written by `python benchmarks/step_parts.py`: each job of `run.py` with lmtune's defaults, "
        f"{PROFILED} timed steps after {WARMUP} warm-up ones, each part replaced by a stand-in that does next to nothing (see the script), "
        f"medians of {ROUNDS} alternated rounds, no profiler. Share: the part of the step's time that disappears. "
        "Shares within 2-3% either way are this machine's noise; the norms' stand-in also changes the values above it.",
        "",
        "| job | tok/s | attention | rotary | norms | LoRA dropout |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for job in JOBS:
        parts = ["whole", "attention", "rotary", "norms"] + (["LoRA dropout"] if "lora" in job else [])
        rates: dict[str, list[float]] = {part: [] for part in parts}
        for round_number in range(ROUNDS):
            for part in parts[round_number % len(parts):] + parts[: round_number % len(parts)]:
                rates[part].append(timed(job, model, data, part))
        rate = {part: statistics.median(values) for part, values in rates.items()}
        share = {part: 1 - rate["whole"] / rate[part] for part in parts[1:]}
        cells = [f"{share[part]:.1%}" if part in share else "-" for part in ("attention", "rotary", "norms", "LoRA dropout")]
        lines.append(f"| {job} | {rate['whole']:,.0f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    write_section("parts", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
