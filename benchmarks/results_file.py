"""benchmarks/RESULTS.md is written by several scripts; each owns one section between its markers."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ORDER = ("baseline", "peers", "lengths", "profile", "parts", "length", "dpo", "grpo", "plan", "board", "data")  # run.py, peers.py,
# length_sweep.py, step_profile.py, step_parts.py, length_step.py, dpo.py, grpo.py, plan_accuracy.py, board.py, data_scale.py
TITLE = "# Benchmark results\n"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: written by its script, do not edit -->", f"<!-- end {name} -->"


def sections(text: str) -> dict[str, str]:
    out = {}
    for name in ORDER:
        begin, end = _markers(name)
        if begin in text and end in text:
            out[name] = text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
    return out


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace one script's section, keeping the others in their order."""
    found = sections(path.read_text()) if path.exists() else {}
    found[name] = body.strip("\n")
    parts = [TITLE]
    for key in ORDER:
        if key in found:
            begin, end = _markers(key)
            parts.append(f"{begin}\n{found[key]}\n{end}\n")
    path.write_text("\n".join(parts))
