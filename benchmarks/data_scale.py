"""The data step at the scale users train on: generated alpaca rows, lmtune against `datasets`.

    python benchmarks/data_scale.py --rows 100000 500000 [2000000] --workers 2   # writes the data section of RESULTS.md

For each size, cold (no cache), each in a fresh process, peak RSS of the process and its workers:
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
import sys
from lmtune.config import load_config
from lmtune.data.pipeline import prepare
from lmtune.model.load import context_length, load_model_config, load_tokenizer
from lmtune.stages import objective_for
config = load_config(sys.argv[1])
tokenizer = load_tokenizer(config)
data = prepare(config, tokenizer, context_length(load_model_config(config)))
assert data.summary.from_cache
batches = objective_for(config).batches(data.train, config, tokenizer, shuffle=True)
next(iter(batches.epoch(0)))
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


def measured(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the process and its children) of a fresh process."""
    script = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
              "code = subprocess.run(sys.argv[1:]).returncode; w = time.perf_counter() - t; "
              "print(w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed: {done.stderr[-2000:]}")
    wall, peak = done.stdout.strip().splitlines()[-1].split()
    return float(wall), float(peak)


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
             "peak RSS of the process and its workers. `datasets` is `load_dataset(\"json\")` + "
             "`.map(batched=True, num_proc)` rendering the same text (`benchmarks/data_scale.py`).", "",
             "| rows | lmtune wall s | lmtune peak MiB | datasets wall s | datasets peak MiB | lmtune warm start to first batch s | cache MiB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for rows in args.rows:
        data = rows_file(work, rows)
        config = lmtune_config(work, data, args.workers)
        subprocess.run(["rm", "-rf", str(work / f"cache-{data.stem}")], check=True)
        ours = measured([sys.executable, "-m", "lmtune", "data", str(config)])
        warm = measured([sys.executable, "-c", FIRST_BATCH, str(config)])
        with tempfile.TemporaryDirectory() as arrow:
            theirs = measured([sys.executable, "-c", DATASETS_MAP, str(data), str(args.workers), arrow])
        size = sum(p.stat().st_size for p in (work / f"cache-{data.stem}").rglob("*") if p.is_file()) / 2**20
        lines.append(f"| {rows:,} | {ours[0]:.1f} | {ours[1]:,.0f} | {theirs[0]:.1f} | {theirs[1]:,.0f} | {warm[0]:.1f} | {size:,.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "The tokenised data is written a chunk at a time into memory-mapped columns and read by training "
              "without loading; what still grows with the row count is the normalised rows, held in memory between "
              "reading and tokenising (about 1 KB a row)."]
    write_section("data", "\n".join(lines))


if __name__ == "__main__":
    main()
