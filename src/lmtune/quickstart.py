"""`lmtune quickstart`: a whole fine-tuning run, offline, in a few minutes on a laptop CPU.

It builds (once, cached) a small Llama-architecture model and tokenizer, writes
a synthetic task (reverse a list of digits), asks the model before training,
fine-tunes it with a generated YAML config, and asks again, printing the
held-out exact-match accuracy both times.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASK = "Reverse the list."


def make_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
        rows.append({"instruction": TASK, "input": " ".join(digits), "output": " ".join(reversed(digits))})
    return rows


def config_text(data_file: Path, run_dir: Path) -> str:
    return f"""\
# Written by `lmtune quickstart`; run it again with: lmtune train {run_dir.parent / 'quickstart.yaml'}
base_model: builtin:small
stage: sft
method: full
dataset: {data_file}
template: chatml
max_input_length: 64
validation_split_ratio: 0.05
train_data_split_seed: 0
packing: true
epochs: 1
learning_rate: 1.0e-3
weight_decay: 0.01
micro_batch_size: 8
gradient_accumulation_steps: 1
lr_scheduler: cosine
warmup_ratio: 0.05
eval_strategy: steps
eval_steps: 100
logging_steps: 10
seed: 0
output_dir: {run_dir}
overwrite_output_dir: true
"""


def accuracy(model, tokenizer, rows: list[dict[str, str]]) -> tuple[float, list[str]]:
    from .generate import answer

    prompts = [[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}] for r in rows]
    answers = []
    for start in range(0, len(prompts), 32):
        answers += answer(model, tokenizer, prompts[start : start + 32], "chatml", max_new_tokens=12)
    hits = sum(a == r["output"] for a, r in zip(answers, rows))
    return hits / len(rows), answers


def run(out: Path, rows: int = 4000) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config.load import load_config
    from .engine.loop import train
    from .model.builtin import builtin_path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / "reverse.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in make_rows(rows, seed=1)))
    held_out = make_rows(60, seed=2)
    config_path = out / "quickstart.yaml"
    config_path.write_text(config_text(data_file, out / "run"))

    print("1/4 building the small offline model (cached after the first time)")
    base = builtin_path("builtin:small")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    before, before_answers = accuracy(model, tokenizer, held_out)

    print(f"2/4 fine-tuning on {rows} synthetic examples: {config_path}")
    result = train(load_config(config_path), config_path.parent)

    print("3/4 asking the fine-tuned model")
    tuned = AutoModelForCausalLM.from_pretrained(result.final_dir)
    after, after_answers = accuracy(tuned, tokenizer, held_out)

    print("4/4 results on held-out lists the model never saw")
    for row, old, new in list(zip(held_out, before_answers, after_answers))[:4]:
        print(f"  {TASK} {row['input']!r:14} expected {row['output']!r:14} before {old[:24]!r:28} after {new!r}")
    print(f"  exact-match accuracy: {before:.0%} before -> {after:.0%} after ({len(held_out)} held-out lists)")
    if result.eval_loss is not None:
        print(f"  eval loss at the end: {result.eval_loss:.4f}")
    print(f"  loss curve: {result.run_dir / 'plots' / 'loss.png'}")
    print(f"  model: {result.final_dir}  (try: lmtune chat {result.run_dir} --prompt 'Reverse the list.\\n\\n1 2 3')")
    return 0
