"""DPO with LoRA: lmtune against TRL's DPOTrainer on the same model and preference data.

    python benchmarks/dpo.py            # 3 alternated runs per tool; writes the DPO section of RESULTS.md
    python benchmarks/dpo.py --runs 1   # a smoke run

TRL is installed for this benchmark only (`pip install trl`); lmtune never
depends on it. TRL runs with its `DPOConfig` defaults except what the job
fixes for both tools: batch 4 pairs, 1 epoch, learning rate, beta 0.1,
sigmoid loss, LoRA r=16 / alpha 32 / dropout 0.05 on the attention
projections, fp32, max length 1024. TRL's defaults include activation
checkpointing and chosen/rejected padded to the longest of the batch; lmtune
runs padding-free with each pair's prompt computed once, with activation
checkpointing (as TRL) and without (lmtune's default).

Reported per tool: pair tokens per second after the first step (each pair's
prompt + chosen and prompt + rejected tokens: TRL computes all of them, lmtune
computes the shared prompt once), peak memory (max RSS of the training process), and held-out reward
accuracy: the share of held-out pairs whose chosen answer gets the higher
implicit reward beta * (log pi - log pi_ref), computed by one function for
both tools from the saved adapter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import write_section  # noqa: E402
from run import LORA, MAX_LEN, WORK, build_model, machine, peak_memory_mb, sentence  # noqa: E402

HERE = Path(__file__).resolve().parent
PAIRS, HELDOUT, BATCH, LR, BETA = 80, 48, 4, 5e-4, 0.1
# lmtune with activation checkpointing, as TRL's DPOConfig has by default, and without it (lmtune's default).
TOOLS = ("trl", "lmtune", "lmtune-no-ckpt")


def build_pairs(folder: Path) -> None:
    """Prompts of 60-600 tokens; the chosen answer ends with "thanks", the rejected one with another word."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    def row() -> dict:
        answer = sentence(rng, int(min(300, max(10, rng.lognormvariate(math.log(60), 0.7)))))
        return {
            "prompt": sentence(rng, int(min(600, max(60, rng.lognormvariate(math.log(200), 0.6))))),
            "chosen": f"{answer} thanks",
            "rejected": f"{answer} {rng.choice(['good', 'bad', 'small', 'large', 'fast', 'slow'])}",
        }

    for name, count in (("train.jsonl", PAIRS), ("heldout.jsonl", HELDOUT)):
        (folder / name).write_text("".join(json.dumps(row()) + "\n" for _ in range(count)))


def child_lmtune(model: Path, data: Path, out: Path, checkpointing: bool) -> dict:
    from lmtune.config.load import resolve
    from lmtune.data.batches import Batches
    from lmtune.engine.loop import train

    marks: dict = {}
    pair_tokens = [0]  # prompt + chosen and prompt + rejected of every pair collated, as TRL's count
    collate = Batches.collate

    def counting_collate(self, examples):
        pair_tokens[0] += sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
        return collate(self, examples)

    Batches.collate = counting_collate

    def on_step(state) -> None:
        now = time.perf_counter()
        if state.global_step == 1:
            marks["first"], marks["start"], marks["tokens0"] = now - STARTED, now, pair_tokens[0]
        marks["end"], marks["tokens"] = now, pair_tokens[0]

    settings = {
        "base_model": str(model), "dataset": str(data / "train.jsonl"), "template": "plain", "stage": "dpo", "method": "lora",
        "pref_beta": BETA, "pref_loss": "sigmoid", "micro_batch_size": BATCH, "epochs": 1, "learning_rate": LR,
        "lr_scheduler": "linear", "max_input_length": MAX_LEN, "validation_split_ratio": 0.0, "logging_steps": 1000,
        "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"], "lora_dropout": LORA["lora_dropout"], "lora_target": ["attention"],
        "output_dir": str(out), "overwrite_output_dir": True, "cache_dir": str(out / "cache"), "plot_loss": False, "seed": 0,
        "gradient_checkpointing": checkpointing,
    }
    resolved = resolve(data=settings)
    assert resolved.config is not None, resolved.errors
    result = train(resolved.config, quiet=True, on_step=on_step)
    return {
        "first_step_s": marks["first"],
        "tokens_per_s": (marks["tokens"] - marks["tokens0"]) / max(marks["end"] - marks["start"], 1e-9),
        "steps": result.steps,
        "peak_mb": peak_memory_mb(),
        "final": str(result.final_dir),
    }


def child_trl(model_dir: Path, data: Path, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    marks: dict = {"real": 0}

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:
                marks["first"], marks["start"], marks["real0"] = now - STARTED, now, marks["real"]
            marks["end"], marks["real_end"] = now, marks["real"]

    class CountingDPO(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            marks["real"] += sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask"))
            return super().training_step(model, inputs, *args, **kwargs)

    arguments = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR, beta=BETA,
        lr_scheduler_type="linear", max_length=MAX_LEN, logging_steps=1000, save_strategy="no", report_to=[], seed=0,
        bf16=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(**LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    dataset = load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    trainer = CountingDPO(model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer, peft_config=lora, callbacks=[Timing()])
    trainer.train()
    final = out / "final"
    trainer.save_model(str(final))
    return {
        "first_step_s": marks["first"],
        "tokens_per_s": (marks["real_end"] - marks["real0"]) / max(marks["end"] - marks["start"], 1e-9),
        "steps": trainer.state.global_step,
        "peak_mb": peak_memory_mb(),
        "final": str(final),
    }


def heldout_reward_accuracy(final: Path, base: Path, data: Path) -> float:
    """Share of held-out pairs where beta * (log pi - log pi_ref) is higher for the chosen answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final).eval()

    def logp(prompt: str, answer: str) -> float:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        a = tokenizer(" " + answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([(p + a)[:MAX_LEN]])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : -1].float()
        return float(torch.log_softmax(logits, -1).gather(-1, ids[0, len(p) :, None]).sum())

    right = 0
    rows = [json.loads(line) for line in (data / "heldout.jsonl").read_text().splitlines()]
    with torch.no_grad():
        for row in rows:
            policy = logp(row["prompt"], row["chosen"]) - logp(row["prompt"], row["rejected"])
            with model.disable_adapter():
                reference = logp(row["prompt"], row["chosen"]) - logp(row["prompt"], row["rejected"])
            right += BETA * (policy - reference) > 0
    return right / len(rows)


def run_child(tool: str, model: Path, data: Path, index: int) -> dict:
    out = WORK / "runs" / f"dpo-{tool}-{index}"
    command = [sys.executable, __file__, "--child", tool, "--model", str(model), "--data", str(data), "--out", str(out)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tool} dpo failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["heldout_accuracy"] = heldout_reward_accuracy(Path(result["final"]), model, data)
    return result


def markdown(results: dict) -> str:
    lines = [
        "## DPO (LoRA): lmtune against TRL's DPOTrainer",
        "",
        f"Written by `python benchmarks/dpo.py`. Machine: {results['machine']}; TRL {results['trl']}.",
        f"Medians of {results['runs']} alternated runs per tool; {PAIRS} training pairs (prompts of 60-600 tokens), "
        f"batch {BATCH} pairs, 1 epoch ({PAIRS // BATCH} steps), lr {LR}, beta {BETA}, fp32, LoRA r=16 on attention.",
        "TRL runs with its DPOConfig defaults otherwise (activation checkpointing on, chosen and rejected padded to the",
        "batch's longest); lmtune with its own (padding-free). Held-out accuracy: share of",
        f"{HELDOUT} held-out pairs whose chosen answer gets the higher implicit reward, one evaluator for both.",
        "",
        "Tokens/s counts each pair's prompt + chosen and prompt + rejected tokens, the work both tools are given;",
        "TRL computes exactly those (non-padding) positions, lmtune computes each prompt once (pairs share it, exactly).",
        "`lmtune` sets `gradient_checkpointing: true` to match TRL's default; `lmtune-no-ckpt` runs lmtune's default.",
        "",
        "| tool | pair tokens/s | peak MB | first step s | held-out reward accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for tool in TOOLS:
        m = results["median"][tool]
        lines.append(f"| {tool} | {m['tokens_per_s']:.0f} | {m['peak_mb']:.0f} | {m['first_step_s']:.1f} | {m['heldout_accuracy']:.2f} |")
    for tool in TOOLS[1:]:
        r = results["ratio"][tool]
        lines.append(f"| **{tool} / trl** | **{r['tokens_per_s']:.2f}x** | **{r['peak_mb']:.2f}x** | **{r['first_step_s']:.2f}x** | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=TOOLS)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        where = (Path(args.model), Path(args.data), Path(args.out))
        outcome = child_trl(*where) if args.child == "trl" else child_lmtune(*where, checkpointing=args.child == "lmtune")
        print(json.dumps(outcome))
        return
    import trl

    model, data = WORK / "model-30m", WORK / "pairs"
    build_model(model)
    build_pairs(data)
    runs: dict = {tool: [] for tool in TOOLS}
    for index in range(args.runs):
        for tool in TOOLS if index % 2 == 0 else TOOLS[::-1]:
            outcome = run_child(tool, model, data, index)
            runs[tool].append(outcome)
            print(f"  {tool:7s} run {index + 1}: {outcome['tokens_per_s']:7.0f} tok/s  peak {outcome['peak_mb']:6.0f} MB  "
                  f"first step {outcome['first_step_s']:5.1f}s  held-out accuracy {outcome['heldout_accuracy']:.2f}", flush=True)
    keys = ("tokens_per_s", "peak_mb", "first_step_s", "heldout_accuracy")
    median = {tool: {k: statistics.median(r[k] for r in runs[tool]) for k in keys} for tool in runs}
    results = {
        "machine": machine(), "trl": trl.__version__, "runs": args.runs, "all": runs, "median": median,
        "ratio": {tool: {k: median[tool][k] / median["trl"][k] for k in ("tokens_per_s", "peak_mb", "first_step_s")} for tool in TOOLS[1:]},
    }
    (HERE / ("results-dpo.json" if args.runs >= 3 else "results-dpo-quick.json")).write_text(json.dumps(results, indent=2))
    section = markdown(results)
    print(section)
    if args.runs >= 3:
        write_section("dpo", section)


if __name__ == "__main__":
    main()
