"""lmtune against the plain Hugging Face baseline, on the same jobs, in the same run.

    python benchmarks/run.py            # full: 3 alternated runs per tool and job, writes RESULTS.md
    python benchmarks/run.py --quick    # 1 run each, fewer rows: a smoke test in a few minutes

The baseline is what a user would otherwise write: transformers `Trainer`
(+ `peft` for LoRA), a collator that pads each batch to its longest example,
no packing. Each run is a fresh child process, so peak memory and time to the
first optimizer step are measured from process start. Both tools train the
same examples for the same number of epochs; the held-out loss of both final
models is computed by one function, here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"

# lmtune runs each job with its defaults (padding-free batching included); `sft_lora_padded` turns
# packing off, to show the padded path is no slower and no hungrier than the baseline.
JOBS = {
    "sft_lora": {"stage": "sft", "method": "lora", "learning_rate": 2e-4},
    "sft_full": {"stage": "sft", "method": "full", "learning_rate": 5e-5},
    "pt": {"stage": "pt", "method": "full", "learning_rate": 5e-5},
    "sft_lora_padded": {"stage": "sft", "method": "lora", "learning_rate": 2e-4, "packing": False},
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)  # lmtune's default dropout, given to peft too
MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
MAX_LEN = 1024


# -- shared setup ---------------------------------------------------------------------------


def build_model(folder: Path) -> None:
    """A ~30M-parameter Llama from a config, with lmtune's builtin tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmtune.model.builtin import builtin_path

    if (folder / "model.safetensors").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(builtin_path("builtin:tiny"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def sentence(rng: random.Random, words: int) -> str:
    from lmtune.model.builtin import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(words))


def build_data(folder: Path, rows: int) -> None:
    """Instruction rows whose tokenised lengths spread from about 30 to 1000 tokens (log-normal)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    def row() -> dict[str, str]:
        total = int(min(1000, max(30, rng.lognormvariate(math.log(220), 0.8))))
        prompt = max(8, int(total * rng.uniform(0.3, 0.7)))
        return {"instruction": sentence(rng, prompt), "output": sentence(rng, max(4, total - prompt))}

    for name, count in (("train.jsonl", rows), ("heldout.jsonl", max(16, rows // 10))):
        with (folder / name).open("w") as handle:
            for _ in range(count):
                handle.write(json.dumps(row()) + "\n")
    with (folder / "text.jsonl").open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": sentence(rng, int(min(1000, max(30, rng.lognormvariate(math.log(220), 0.8)))))}) + "\n")


def lmtune_config(job: str, model: Path, data: Path, out: Path, epochs: float, max_steps: int = -1) -> dict:
    spec = JOBS[job]
    config = {
        "base_model": str(model),
        "stage": spec["stage"],
        "method": spec["method"],
        "dataset": str(data / ("text.jsonl" if job == "pt" else "train.jsonl")),
        "template": None if job == "pt" else "alpaca",
        "max_input_length": MAX_LEN,
        "micro_batch_size": 4,  # the baseline's 4 examples per step, laid out without padding by default
        "epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": spec["learning_rate"],
        "lr_scheduler": "linear",
        "logging_steps": 1000,
        "output_dir": str(out),
        "overwrite_output_dir": True,
        "cache_dir": os.environ.get("LMTUNE_BENCH_CACHE", str(out / "cache")),
        "plot_loss": False,
        "seed": 0,
    }
    if "packing" in spec:
        config["packing"] = spec["packing"]
    if spec["method"] == "lora":
        config.update(lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], lora_target=["attention"])
    return config


# -- the two tools, each in its own process --------------------------------------------------


def peak_memory_mb() -> float:
    """This process's peak memory. On Linux the high-water mark of its own address space (VmHWM): ru_maxrss also
    counts the parent's resident memory at the fork (the kernel folds the forked copy into it at exec), so a child
    started by a parent that had loaded a model would report the parent's peak."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_lmtune(job: str, model: Path, data: Path, out: Path, epochs: float, max_steps: int) -> dict:
    from lmtune.config.load import resolve
    from lmtune.model.unused_imports import skip_bitsandbytes_unless_needed

    marks: dict = {}

    def on_step(state) -> None:
        now = time.perf_counter()
        if state.global_step == 1:
            marks["first"] = now - STARTED
            marks["start"], marks["tokens0"] = now, state.real_tokens
        marks["end"], marks["tokens"] = now, state.real_tokens

    resolved = resolve(data=lmtune_config(job, model, data, out, epochs, max_steps))
    assert resolved.config is not None, resolved.errors
    skip_bitsandbytes_unless_needed(resolved.config)  # what `lmtune train` does in its own process
    from lmtune.engine.loop import train

    imports = time.perf_counter() - STARTED  # interpreter, lmtune, torch, transformers, accelerate
    result = train(resolved.config, quiet=True, on_step=on_step)
    steady = max(marks["end"] - marks["start"], 1e-9)
    return {
        "first_step_s": marks["first"],
        "tokens_per_s": (marks["tokens"] - marks["tokens0"]) / steady,
        "steps": result.steps,
        "padding": 0.0 if resolved.config.data.packing is not False else _lmtune_padding(resolved.config),
        "startup": {"imports": round(imports, 3), **result.startup},
        "peak_mb": peak_memory_mb(),
        "final": str(result.final_dir),
    }


def _lmtune_padding(config) -> float:
    from transformers import AutoTokenizer

    from lmtune.data.pipeline import prepare
    from lmtune.stages import objective_for

    tokenizer = AutoTokenizer.from_pretrained(config.model.base_model)
    data = prepare(config, tokenizer, 2048)
    return objective_for(config).batches(data.train, config, tokenizer, True, packing=False).padding_fraction()


def child_baseline(job: str, model_dir: Path, data: Path, out: Path, epochs: float, max_steps: int) -> dict:
    """What a user writes with plain transformers + peft: tokenize, pad to longest, Trainer."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    spec = JOBS[job]
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(**LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    if job == "pt":
        raw = load_dataset("json", data_files=str(data / "text.jsonl"), split="train")

        def chunk(batch):
            ids = [t for text in batch["text"] for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
            blocks = [ids[i : i + MAX_LEN] for i in range(0, len(ids), MAX_LEN)]
            return {"input_ids": blocks, "labels": blocks, "attention_mask": [[1] * len(b) for b in blocks]}

        dataset = raw.map(chunk, batched=True, batch_size=len(raw), remove_columns=raw.column_names)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest")
    else:
        raw = load_dataset("json", data_files=str(data / "train.jsonl"), split="train")

        def encode(row):
            prompt = f"{tokenizer.bos_token}### Instruction:\n{row['instruction']}\n\n### Response:\n"
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = (p + a)[:MAX_LEN]
            return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p) + a)[:MAX_LEN]}

        dataset = raw.map(encode, remove_columns=raw.column_names)
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    marks: dict = {"real": 0, "positions": 0}

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:
                marks["first"] = now - STARTED
                marks["start"], marks["real0"] = now, marks["real"]
            marks["end"], marks["real_end"] = now, marks["real"]

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            marks["real"] += int(mask.sum())
            marks["positions"] += mask.numel()
            return super().training_step(model, inputs, *args, **kwargs)

    arguments = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_train_epochs=epochs,
        max_steps=max_steps,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="linear",
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = CountingTrainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator, callbacks=[Timing()])
    trainer.train()
    final = out / "final"
    trainer.save_model(str(final))
    steady = max(marks["end"] - marks["start"], 1e-9)
    return {
        "first_step_s": marks["first"],
        "tokens_per_s": (marks["real_end"] - marks["real0"]) / steady,
        "steps": trainer.state.global_step,
        "padding": 1 - marks["real"] / marks["positions"],
        "peak_mb": peak_memory_mb(),
        "final": str(final),
    }


# -- held-out loss, the same function for both ---------------------------------------------------


def heldout_loss(final: Path, base: Path, data: Path, job: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for line in (data / "heldout.jsonl").read_text().splitlines():
            row = json.loads(line)
            if job == "pt":
                ids = tokenizer(row["instruction"] + " " + row["output"], add_special_tokens=False)["input_ids"][:MAX_LEN]
                labels = list(ids)
            else:
                p = tokenizer(f"{tokenizer.bos_token}### Instruction:\n{row['instruction']}\n\n### Response:\n", add_special_tokens=False)["input_ids"]
                a = tokenizer(row["output"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                ids, labels = (p + a)[:MAX_LEN], ([-100] * len(p) + a)[:MAX_LEN]
            input_ids = torch.tensor([ids])
            target = torch.tensor([labels])[:, 1:]
            logits = model(input_ids=input_ids).logits[:, :-1]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def command_speed(runs: int = 11) -> dict:
    """Wall time of `lmtune check`, `lmtune explain` and `lmtune plan` (local model) on a config, median of `runs` after a warm-up.

    Bytecode caching is on, as on any machine where Python may write
    `__pycache__` (some sandboxes set PYTHONDONTWRITEBYTECODE; an editable
    install would then recompile lmtune on every call).
    """
    config = Path(__file__).resolve().parents[1] / "examples" / "sft_lora.yaml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    local = WORK / "plan-command.yaml"  # plan on a local model folder: config.json only
    local.write_text(json.dumps({"base_model": str(WORK / "model-30m"), "dataset": str(config.parent / "data" / "reverse.jsonl")}))
    out = {}
    for name, argv in (("check", ["check", str(config)]), ("explain", ["explain", str(config)]), ("plan", ["plan", str(local)])):
        command = [sys.executable, "-m", "lmtune", *argv]
        subprocess.run(command, capture_output=True, check=False, env=env)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=False, env=env)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def data_cache_speed(rows: int = 20000) -> dict:
    """The data step on a 20k-row dataset: tokenised from scratch, then again from the cache."""
    from transformers import AutoTokenizer

    from lmtune.config.load import resolve
    from lmtune.data.pipeline import prepare
    from lmtune.model.builtin import builtin_path

    folder = WORK / f"data-{rows}"
    if not (folder / "train.jsonl").exists():
        build_data(folder, rows)
    tokenizer = AutoTokenizer.from_pretrained(builtin_path("builtin:tiny"))
    timings = {}
    for label, overwrite in (("cold", True), ("warm", False)):
        settings = {"base_model": "builtin:tiny", "dataset": str(folder / "train.jsonl"), "template": "alpaca",
                    "cache_dir": str(WORK / "cache"), "overwrite_cache": overwrite, "max_input_length": MAX_LEN}
        config = resolve(data=settings).config
        start = time.perf_counter()
        data = prepare(config, tokenizer, 2048)
        timings[label] = time.perf_counter() - start
        timings[f"{label}_from_cache"] = data.summary.from_cache
    timings["rows"] = rows
    timings["speedup"] = timings["cold"] / timings["warm"]
    return timings


# -- orchestration --------------------------------------------------------------------------------


def run_child(tool: str, job: str, model: Path, data: Path, epochs: float, index: int, warm: bool = False) -> dict:
    """One run in a fresh process. Cold: the tool's data cache is emptied first (what a newcomer's first
    run meets). Warm: a 2-step run over the cache the cold run left, timed to its first step only."""
    import shutil

    out = WORK / "runs" / f"{job}-{tool}-{index}"
    caches = (out / "cache", out / "hf-datasets")  # lmtune's tokenised data; the baseline's `datasets` cache
    if not warm:
        for folder in caches:
            shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, __file__, "--child", tool, "--job", job, "--model", str(model), "--data", str(data),
               "--out", str(out / ("warm" if warm else "run")), "--epochs", str(epochs), "--max-steps", "2" if warm else "-1"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(caches[1]), "LMTUNE_BENCH_CACHE": str(caches[0])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tool} {job} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not warm:
        result["heldout_loss"] = heldout_loss(Path(result["final"]), model, data, job)
    return result


def matmul_peak_gflops(size: int = 2048, seconds: float = 3.0) -> float:
    """This machine's fp32 matmul throughput (all threads torch uses), best of repeated products."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best / 1e9


def model_flops_per_token(model: Path, data: Path, job: str) -> float:
    """Training FLOPs per real token: 6 per matmul weight (4 with LoRA: frozen weights get no weight
    gradient), plus causal attention 12 x layers x hidden x the mean context a token attends to."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    weights = layers * (2 * d * d + 2 * d * kv + 3 * d * inter) + d * config.vocab_size
    per_weight = 4 if JOBS[job]["method"] == "lora" else 6
    if job == "pt":
        lengths = [MAX_LEN]
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        lengths = [min(MAX_LEN, len(tokenizer(r["instruction"] + " " + r["output"])["input_ids"]) + 12) for r in rows]
    context = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
    return per_weight * weights + 12 * layers * d * context


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {device}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 run per tool and job on fewer rows")
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--child", choices=["lmtune", "baseline"])
    parser.add_argument("--job")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args()

    if args.child:
        child = child_lmtune if args.child == "lmtune" else child_baseline
        print(json.dumps(child(args.job, Path(args.model), Path(args.data), Path(args.out), args.epochs, args.max_steps)))
        return

    runs = args.runs or (1 if args.quick else 3)
    rows = args.rows or (48 if args.quick else 128)
    model, data = WORK / "model-30m", WORK / f"data-{rows}"
    print(f"building the benchmark model and {rows} rows of data in {WORK}")
    build_model(model)
    build_data(data, rows)
    results: dict = {"machine": machine(), "runs": runs, "rows": rows, "jobs": {}}
    results["matmul_peak_gflops"] = matmul_peak_gflops()
    print(f"fp32 matmul peak: {results['matmul_peak_gflops']:.1f} GFLOP/s")
    keys = ("tokens_per_s", "padding", "peak_mb", "first_step_s", "heldout_loss", "warm_first_step_s")
    for job in args.jobs.split(","):
        per_tool: dict = {"lmtune": [], "baseline": []}
        for index in range(runs):
            for tool in ("baseline", "lmtune") if index % 2 == 0 else ("lmtune", "baseline"):  # alternate
                outcome = run_child(tool, job, model, data, 1.0, index)
                outcome["warm_first_step_s"] = run_child(tool, job, model, data, 1.0, index, warm=True)["first_step_s"]
                per_tool[tool].append(outcome)
                print(f"  {job:15} {tool:8} run {index + 1}: {outcome['tokens_per_s']:8.0f} tok/s  padding {outcome['padding']:5.1%}  "
                      f"peak {outcome['peak_mb']:7.0f} MB  first step {outcome['first_step_s']:5.1f}s cold, "
                      f"{outcome['warm_first_step_s']:5.1f}s warm  held-out {outcome['heldout_loss']:.4f}")
        median = {tool: {k: statistics.median(r[k] for r in rs) for k in keys} for tool, rs in per_tool.items()}
        flops = model_flops_per_token(model, data, job)
        for tool in ("lmtune", "baseline"):
            median[tool]["peak_share"] = flops * median[tool]["tokens_per_s"] / (results["matmul_peak_gflops"] * 1e9)
        median["ratio"] = {k: median["lmtune"][k] / median["baseline"][k] for k in ("tokens_per_s", "peak_mb", "first_step_s", "warm_first_step_s")}
        median["flops_per_token"] = flops
        results["jobs"][job] = median
    results["commands_s"] = command_speed()
    results["data_cache"] = data_cache_speed(2000 if args.quick else 20000)
    out_json = HERE / ("results-quick.json" if args.quick else "results.json")
    out_json.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    print(table)
    if not args.quick:  # the other scripts' sections stay
        from results_file import write_section

        write_section("baseline", table)


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']}. Medians of {results['runs']} alternated runs per tool, {results['rows']} training rows, 1 epoch.",
        "Written by `python benchmarks/run.py`; ratios are lmtune / baseline (transformers Trainer + peft, padding to the longest).",
        "lmtune runs with its defaults (padding-free batching on); `sft_lora_padded` sets `packing: false`.",
        "First step: seconds from process start to the end of the first optimizer step, with the tool's data cache",
        "emptied (cold: lmtune's tokenised-data cache, the baseline's `datasets` cache) and again over that cache (warm).",
        "Share of peak: model FLOPs of the real (non-padding) tokens per second over this machine's fp32 matmul peak,",
        f"measured in the same run: {results['matmul_peak_gflops']:.1f} GFLOP/s (2048x2048 products, all threads).",
        "",
        "| job | tool | non-padding tok/s | share of fp32 peak | padding | peak MB | first step s (cold) | first step s (warm) | held-out loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for job, median in results["jobs"].items():
        for tool in ("baseline", "lmtune"):
            m = median[tool]
            lines.append(
                f"| {job} | {tool} | {m['tokens_per_s']:.0f} | {m['peak_share']:.1%} | {m['padding']:.1%} | {m['peak_mb']:.0f} | "
                f"{m['first_step_s']:.1f} | {m['warm_first_step_s']:.1f} | {m['heldout_loss']:.4f} |"
            )
        r = median["ratio"]
        lines.append(
            f"| {job} | **ratio** | **{r['tokens_per_s']:.2f}x** | | | **{r['peak_mb']:.2f}x** | "
            f"**{r['first_step_s']:.2f}x** | **{r['warm_first_step_s']:.2f}x** | |"
        )
    c = results["commands_s"]
    lines += ["", f"`lmtune check`: {c['check']:.2f} s, `lmtune explain`: {c['explain']:.2f} s, `lmtune plan` on a local model folder: "
              f"{c.get('plan', float('nan')):.2f} s (wall, median of 11 after a warm-up, bytecode cached)."]
    d = results["data_cache"]
    lines += [
        "",
        f"Data step on {d['rows']} rows: {d['cold']:.2f} s tokenising, {d['warm']:.3f} s from the cache "
        f"(**{d['speedup']:.0f}x**; the warm run did no tokenisation: {d['warm_from_cache']}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
