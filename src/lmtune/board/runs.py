"""What the board knows about a run, read from its folder alone (no torch, nothing guessed).

A run folder is one that holds `config.resolved.yaml` or `metrics.jsonl`. Its status comes from the writer's
lock (engine/lock.py): held by a live process is running; released with an outcome is that outcome; a
`summary.json` is finished; anything else (a lock whose holder died) is failed. A line of metrics.jsonl that
is not JSON is skipped and named, never fatal: a run being written has a half-written last line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from ..engine.lock import NAME as LOCK, alive, holder  # noqa: F401  (holder: the server reads it through here)

CURVES = ("loss", "eval_loss", "lr", "grad_norm")  # first in the page; each stage's own metrics follow


def is_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / "config.resolved.yaml").is_file() or (folder / "metrics.jsonl").is_file())


def find_runs(root: Path, depth: int = 4) -> list[Path]:
    """Run folders under root (nested ones too), as paths relative to it, without following links out of it."""
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
        except OSError:
            continue
        for child in children:
            if is_run(child):
                found.append(child.relative_to(root))
            elif level < depth and child.name not in ("checkpoints", "final", "plots", "tensorboard", "cache"):
                stack.append((child, level + 1))
    return sorted(found)


def inside(root: Path, name: str) -> Optional[Path]:
    """The run folder `name` names, only if it lies inside root (no `..`, no absolute path, no link out)."""
    try:
        path = (root / name).resolve()
        path.relative_to(root.resolve())
    except (ValueError, OSError):
        return None
    return path if is_run(path) else None


def read_config(folder: Path) -> tuple[dict[str, Any], Optional[str]]:
    import yaml

    path = folder / "config.resolved.yaml"
    if not path.is_file():
        return {}, "no config.resolved.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return {}, f"config.resolved.yaml cannot be read ({str(exc).splitlines()[0]})"
    return (loaded, None) if isinstance(loaded, dict) else ({}, "config.resolved.yaml is not a mapping")


def read_metrics(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    records, problems = [], []
    try:
        text = (folder / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return [], []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines) or text.endswith("\n"):  # the last line of a live run may be half-written
                problems.append(f"metrics.jsonl line {number} is not JSON (skipped)")
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records, problems


def status_of(folder: Path) -> str:
    found = holder(folder)
    if found and not found.get("released") and alive(found, folder):
        return "running"
    if found and found.get("outcome"):
        return str(found["outcome"])
    if (folder / "summary.json").is_file():
        return "finished"
    return "failed" if (folder / LOCK).exists() else "unknown"


def summary(root: Path, name: Path, with_metrics: bool = True) -> dict[str, Any]:
    """One run as the board shows it; `problems` names what could not be read, the rest is what could."""
    folder = root / name
    config, config_problem = read_config(folder)
    records, problems = read_metrics(folder)
    problems = ([config_problem] if config_problem else []) + problems
    trained = [r for r in records if "loss" in r]
    evaluated = [r for r in records if "eval_loss" in r]
    total = config.get("max_steps") if isinstance(config.get("max_steps"), int) and config.get("max_steps", 0) > 0 else None
    try:
        ended = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        ended = {}
    steps = int(trained[-1]["step"]) if trained else 0
    started = _mtime(folder / "config.resolved.yaml")
    last = _mtime(folder / "metrics.jsonl") or started
    elapsed = ended.get("seconds") or ((last - started) if started and last else None)
    per_step = elapsed / steps if elapsed and steps else None
    total = total or ended.get("steps")
    out = {
        "name": str(name), "status": status_of(folder), "stage": config.get("stage"), "method": config.get("method"),
        "model": config.get("base_model"), "steps": steps, "total_steps": total,
        "last_loss": trained[-1]["loss"] if trained else None,
        "best_loss": min(r["loss"] for r in trained) if trained else None,
        "last_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
        "seconds_per_step": per_step, "elapsed_seconds": elapsed,
        "seconds_left": per_step * (total - steps) if per_step and total and total > steps else None,
        "problems": problems, "updated": last, "has_model": (folder / "final").is_dir(),
    }
    if with_metrics:
        out["metrics"] = records
        out["config"] = config
    return out


def _mtime(path: Path) -> Optional[float]:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def samples(folder: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The last sampled answers a run wrote (completions.jsonl: grpo's answers with their rewards)."""
    try:
        lines = (folder / "completions.jsonl").read_text(errors="replace").splitlines()[-limit:]
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def differences(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Setting -> {run: value}, for the settings whose values are not the same in every run."""
    keys = sorted({key for config in configs.values() for key in config})
    out = {}
    for key in keys:
        values = {run: config.get(key) for run, config in configs.items()}
        if len({json.dumps(v, sort_keys=True, default=str) for v in values.values()}) > 1:
            out[key] = values
    return out


def fingerprint(root: Path) -> str:
    """Changes when any run's metrics, config, summary or lock changes: what the live stream watches."""
    parts = []
    for name in find_runs(root):
        folder = root / name
        for file in ("metrics.jsonl", "config.resolved.yaml", "summary.json", LOCK):
            stamp = _mtime(folder / file)
            parts.append(f"{name}/{file}:{stamp}")
    return str(hash("|".join(parts))) + f":{int(time.time() // 30)}"  # also every 30 s: elapsed times move on
