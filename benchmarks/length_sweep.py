"""lmtune's defaults against plain Trainer + peft at uniform lengths, 256 to 8,192 tokens per example.

    python benchmarks/length_sweep.py                               # 3 rounds, every length (about 30 minutes)
    python benchmarks/length_sweep.py --lengths 4096 --rounds 1     # a quick look

The ~27M-parameter Llama of peers.py with a context of 8,192, LoRA r16 (dropout 0.05) on q,k,v,o, AdamW, fp32,
pre-training rows of exactly L tokens (documents joined and cut into rows, as both tools do for pt), 2 rows
per step: nothing to save from padding, so this measures the step itself. Each run is a fresh process; tokens/s
from the first step's end to the last; peak memory is the process's high-water RSS. Fewer steps at the longest
lengths keep the sweep short. Medians of the rounds, the two tools alternated. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402

WORK = HERE / ".work" / "lengths"
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
TOOLS = ("lmtune", "trainer")


def steps_at(length: int) -> int:
    return 10 if length <= 1024 else 6 if length <= 2048 else 4 if length <= 4096 else 3


def build(model: Path, data: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmtune.model.builtin import builtin_path
    from run import MODEL, sentence

    if not (model / "model.safetensors").exists():
        tokenizer = AutoTokenizer.from_pretrained(builtin_path("builtin:tiny"))
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **MODEL)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(model, safe_serialization=True)
        tokenizer.save_pretrained(model)
    if not data.exists():
        rng = random.Random(0)
        data.parent.mkdir(parents=True, exist_ok=True)
        with data.open("w") as handle:  # about 180k tokens: 3 steps of 2 rows of 8,192 need 49k
            for _ in range(300):
                handle.write(json.dumps({"text": sentence(rng, 600)}) + "\n")


def peak_mb() -> float:
    return next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))


def rate(marks: list[tuple[float, int]]) -> float:
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9)


def child_lmtune(model: str, data: str, out: str, length: int, steps: int) -> dict:
    from lmtune.config.load import resolve
    from lmtune.engine.loop import train
    from lmtune.model.unused_imports import skip_bitsandbytes_unless_needed

    config = {"base_model": model, "stage": "pt", "dataset": data, "max_input_length": length, "max_steps": steps,
              "method": "lora", "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": LORA["lora_dropout"],
              "lora_target": ["attention"], "learning_rate": 2e-4, "micro_batch_size": 2, "logging_steps": 1,
              "save_steps": 100 * steps, "output_dir": out, "overwrite_output_dir": True, "cache_dir": str(Path(out) / "cache"),
              "plot_loss": False, "seed": 0}
    resolved = resolve(data=config)
    if resolved.config is None:
        raise SystemExit("; ".join(f"{p.key}: {p.message}" for p in resolved.errors))
    skip_bitsandbytes_unless_needed(resolved.config)
    marks: list = []
    train(resolved.config, quiet=True, on_step=lambda state: marks.append((time.perf_counter(), state.real_tokens)))
    return {"tokens_per_s": rate(marks), "peak_mb": peak_mb(), "steps": len(marks)}


def child_trainer(model_dir: str, data: str, out: str, length: int, steps: int) -> dict:
    """What a user writes with transformers + peft: tokenize, cut into rows of `length`, Trainer."""
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(**LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    raw = load_dataset("json", data_files=data, split="train")

    def rows(batch):
        ids = [t for text in batch["text"] for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
        blocks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
        return {"input_ids": blocks, "labels": blocks, "attention_mask": [[1] * length for _ in blocks]}

    dataset = raw.map(rows, batched=True, batch_size=len(raw), remove_columns=raw.column_names)
    marks: list = []
    counted = {"tokens": 0}

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), counted["tokens"]))

    class Counting(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            counted["tokens"] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    arguments = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=steps, learning_rate=2e-4,
                                  logging_steps=1000, save_strategy="no", report_to=[], seed=0, use_cpu=True,
                                  dataloader_num_workers=0, disable_tqdm=True)
    Counting(model=model, args=arguments, train_dataset=dataset, data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
             callbacks=[Timing()]).train()
    return {"tokens_per_s": rate(marks), "peak_mb": peak_mb(), "steps": len(marks)}


def one_run(tool: str, model: Path, data: Path, length: int) -> dict | None:
    out = WORK / "runs" / f"{tool}-{length}"
    out.mkdir(parents=True, exist_ok=True)
    result = out.with_suffix(".json")
    result.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, __file__, "--child", tool, str(model), str(data), str(out), str(length), str(result)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out)
    if done.returncode != 0 or not result.exists():
        print(f"{tool} {length}: failed: {(done.stderr.strip() or done.stdout.strip())[-1500:]}", flush=True)
        return None
    return json.loads(result.read_text())


def report(runs: dict, rounds: int) -> str:
    lines = ["## Uniform lengths: lmtune's defaults against Trainer + peft", "",
             f"`benchmarks/length_sweep.py`: the ~27M-parameter Llama (context 8,192), LoRA r16 on q,k,v,o, 2 rows of exactly "
             f"L tokens per step (pt rows, no padding), fp32, on this {os.cpu_count()}-core CPU; medians of {rounds} rounds, "
             "the tools alternated; steps per run: 10 up to 1,024 tokens, 6 at 2,048, 4 at 4,096, 3 at 8,192.", "",
             "| tokens per example | lmtune tok/s | lmtune peak MiB | Trainer + peft tok/s | Trainer + peft peak MiB | speed, lmtune / Trainer | memory, lmtune / Trainer |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in sorted({length for length, _ in runs}):
        got = {tool: runs.get((length, tool)) for tool in TOOLS}
        if not all(got.values()):
            continue
        m = {tool: {k: statistics.median(r[k] for r in got[tool]) for k in ("tokens_per_s", "peak_mb")} for tool in TOOLS}
        lines.append(f"| {length:,} | {m['lmtune']['tokens_per_s']:,.0f} | {m['lmtune']['peak_mb']:,.0f} | {m['trainer']['tokens_per_s']:,.0f} | "
                     f"{m['trainer']['peak_mb']:,.0f} | **{m['lmtune']['tokens_per_s'] / m['trainer']['tokens_per_s']:.2f}x** | "
                     f"{m['lmtune']['peak_mb'] / m['trainer']['peak_mb']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--child", nargs=6)
    args = parser.parse_args()
    if args.child:
        tool, model, data, out, length, result = args.child
        child = child_lmtune if tool == "lmtune" else child_trainer
        Path(result).write_text(json.dumps(child(model, data, out, int(length), steps_at(int(length)))))
        return
    model, data = WORK / "model-8k", WORK / "text.jsonl"
    build(model, data)
    stored_file = HERE / "results-lengths.json"
    stored = {tuple(json.loads(k)): v for k, v in json.loads(stored_file.read_text()).items()} if stored_file.exists() else {}
    runs: dict = {}
    for round_number in range(args.rounds):
        for length in args.lengths:
            for tool in (TOOLS if round_number % 2 == 0 else TOOLS[::-1]):
                got = one_run(tool, model, data, length)
                if got:
                    runs.setdefault((length, tool), []).append(got)
                    print(f"round {round_number + 1} {length} {tool}: {got['tokens_per_s']:.0f} tok/s, {got['peak_mb']:.0f} MiB", flush=True)
    stored.update(runs)  # a later call for some lengths replaces theirs and reports beside the rest
    stored_file.write_text(json.dumps({json.dumps(list(k)): v for k, v in stored.items()}, indent=1))
    text = report(stored, min(len(v) for v in stored.values()))
    write_section("lengths", text)
    print(text)


if __name__ == "__main__":
    main()
