"""The data step at the scale users train on: generated alpaca rows, lmtune against `datasets`.

    python benchmarks/data_scale.py --rows 100000 500000 [2000000] --workers 2   # writes the data section of RESULTS.md

For each size, cold (no cache), each in a fresh process, peak memory: PSS summed over the process and its workers (shared pages counted once):
- lmtune: `lmtune data` on a config naming the file (read, render, tokenise, write the cache).
- datasets: `load_dataset("json")` + `.map(batched=True, num_proc=workers)` rendering the same ChatML text with
  the same tokenizer (the usual Trainer / TRL preprocessing), its Arrow cache in a fresh folder.
Warm: a fresh process with the cache present, from its start to the first training batch (what a run pays
before its first step, the model aside).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402

WORDS = "the a of to in and model data loss rate token answer question list number reverse sort count".split()

DATASETS_MAP = r"""
import sys, time
from datasets import load_dataset, disable_caching
from transformers import AutoTokenizer
from lmtune.model.builtin import builtin_path
path, workers, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tok = AutoTokenizer.from_pretrained(builtin_path("builtin:tiny"))
def render(batch):
    texts = [f"<|im_start|>user\n{i}\n\n{x}<|im_end|>\n<|im_start|>assistant\n{o}<|im_end|>\n"
             for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]
    return tok(texts, add_special_tokens=False)
data = load_dataset("json", data_files=path, split="train", cache_dir=cache)
data.map(render, batched=True, num_proc=workers if workers > 1 else None, remove_columns=data.column_names)
"""

FIRST_BATCH = r"""
import sys, time
from lmtune.config import load_config
from lmtune.data.pipeline import prepare
from lmtune.model.load import context_length, load_model_config, load_tokenizer
from lmtune.stages import objective_for
config = load_config(sys.argv[1])
tokenizer = load_tokenizer(config)
began = time.perf_counter()
data = prepare(config, tokenizer, context_length(load_model_config(config)))
assert data.summary.from_cache
batches = objective_for(config).batches(data.train, config, tokenizer, shuffle=True)
next(iter(batches.epoch(0)))
print("DATA", time.perf_counter() - began)
"""


def rows_file(folder: Path, rows: int) -> Path:
    path = folder / f"alpaca-{rows}.jsonl"
    if not path.exists():
        rng = random.Random(rows)
        with path.open("w") as out:
            for _ in range(rows):
                row = {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(4, 16))),
                       "input": " ".join(rng.choices(WORDS, k=rng.randint(0, 12))),
                       "output": " ".join(rng.choices(WORDS, k=rng.randint(8, 40)))}
                out.write(json.dumps(row) + "\n")
    return path


def _tree(root: int) -> list[int]:
    """The process and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _pss_mib(pids: list[int]) -> float:
    """Proportional set size summed: a page shared by n processes counts 1/n in each (mapped caches once)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def measured(command: list[str], limit: float = 3600) -> tuple[float, float, str]:
    """(wall seconds, peak memory MiB: PSS summed over the process and all its workers, sampled every 0.5 s,
    what it printed); wall is inf when it ran past `limit` seconds (stopped)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _pss_mib(_tree(process.pid)))
        if time.perf_counter() - started > limit:
            for pid in _tree(process.pid):
                subprocess.run(["kill", "-9", str(pid)])
            process.wait()
            return float("inf"), peak, ""
        time.sleep(0.5)
    wall = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{command[:3]} failed: {err[-2000:]}")
    return wall, peak, out


def _cache_pages(pid: int, folder: Path) -> tuple[float, float]:
    """(RSS, PSS) MiB of the process's mappings of files under `folder` (the tokenised-data cache)."""
    rss = pss = 0
    inside = False
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5].startswith(str(folder))
            elif inside and line.startswith("Rss:"):
                rss += int(head[1])
            elif inside and line.startswith("Pss:"):
                pss += int(head[1])
    except OSError:
        pass
    return rss / 1024, pss / 1024


def two_processes(work: Path, config: Path) -> str:
    """A 2-process run on the cached data: each rank's resident pages of the cache, and their PSS sum (the host's
    copies: one when the ranks share the page cache)."""
    run_config = config.with_name(config.stem + "-2proc.yaml")
    cache = work / f"cache-{config.stem}"
    run_config.write_text(config.read_text() + "max_steps: 6\nlogging_steps: 1\nsave_steps: 1000\noverwrite_output_dir: true\n")
    process = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(run_config), "--nproc", "2"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    best: tuple[float, list[tuple[float, float]]] = (0.0, [])
    while process.poll() is None:
        ranks = [pid for pid in _tree(process.pid) if "train" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        pages = [_cache_pages(pid, cache.resolve()) for pid in ranks]
        pages = [p for p in pages if p[0] > 0]
        if len(pages) >= 2 and sum(r for r, _ in pages) > best[0]:
            best = (sum(r for r, _ in pages), pages)
        time.sleep(0.2)
    if process.returncode != 0:
        raise SystemExit(f"2-process run failed: {process.stderr.read()[-2000:]}")
    pages = best[1]
    return (f"Two processes training on the cached {config.stem} (`--nproc 2`): each maps the same cache files; at the "
            f"peak the ranks held {', '.join(f'{r:.1f}' for r, _ in pages)} MiB of them resident (RSS), and their PSS "
            f"sums to {sum(p for _, p in pages):.1f} MiB: one copy on the host, shared through the page cache.")


def lmtune_config(folder: Path, data: Path, workers: int) -> Path:
    path = folder / f"{data.stem}.yaml"
    path.write_text(f"base_model: builtin:tiny\ndataset: {data}\ntemplate: chatml\ncache_dir: {folder / ('cache-' + data.stem)}\n"
                    f"preprocessing_num_workers: {workers}\noutput_dir: {folder / 'run'}\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 500_000])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = HERE / ".work" / "data"
    work.mkdir(parents=True, exist_ok=True)
    lines = ["## The data step at scale", "",
             f"Generated alpaca rows, ChatML, the builtin tokenizer, {args.workers} workers, cold caches; "
             "peak memory: PSS summed over the process and its workers (shared pages counted once). `datasets` is `load_dataset(\"json\")` + "
             "`.map(batched=True, num_proc)` rendering the same text (`benchmarks/data_scale.py`).", "",
             "| rows | lmtune wall s | rows/s | lmtune peak MiB | datasets wall s | rows/s | datasets peak MiB | "
             "lmtune warm: process start to first batch s (the data's share) | cache MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rows in args.rows:
        data = rows_file(work, rows)
        config = lmtune_config(work, data, args.workers)
        subprocess.run(["rm", "-rf", str(work / f"cache-{data.stem}")], check=True)
        ours = measured([sys.executable, "-m", "lmtune", "data", str(config)])
        warm = measured([sys.executable, "-c", FIRST_BATCH, str(config)])
        share = float(warm[2].split("DATA")[-1])
        with tempfile.TemporaryDirectory() as arrow:  # a pool that hangs is stopped at 2x lmtune's time
            theirs = measured([sys.executable, "-c", DATASETS_MAP, str(data), str(args.workers), arrow], 2 * ours[0] + 60)
        size = sum(p.stat().st_size for p in (work / f"cache-{data.stem}").rglob("*") if p.is_file()) / 2**20
        wall = f"{theirs[0]:.1f}" if theirs[0] != float("inf") else f"did not finish in {2 * ours[0] + 60:.0f} (its pool hung)"
        lines.append(f"| {rows:,} | {ours[0]:.1f} | {rows / ours[0]:,.0f} | {ours[1]:,.0f} | {wall} | "
                     f"{rows / theirs[0]:,.0f} | {theirs[1]:,.0f} | {warm[0]:.1f} ({share:.1f}) | {size:,.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "Rows are indexed by position (a JSON-lines file by its line offsets), read and tokenised in the "
              "workers a chunk at a time, and written into memory-mapped columns that training reads without loading; "
              "the main process holds the index (about 20 bytes a row) and a few chunks in flight.", "",
              two_processes(work, lmtune_config(work, rows_file(work, args.rows[0]), args.workers))]
    write_section("data", "\n".join(lines))


if __name__ == "__main__":
    main()
