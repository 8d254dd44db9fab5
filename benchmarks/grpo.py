"""GRPO with LoRA: lmtune against TRL's GRPOTrainer on the same model, prompts, reward and steps.

    python benchmarks/grpo.py            # 3 alternated runs per tool; writes the GRPO section of RESULTS.md
    python benchmarks/grpo.py --runs 1   # a smoke run

TRL is installed for the benchmarks only (`pip install trl`); lmtune never depends on it. Both tools start from
the ~30M-parameter Llama of run.py (built in code) taught by a short sft to answer with a few words, and get the same prompts (100-200 words, as RLVR prompts with their
instructions run), the same reward function, 8 generations per prompt, up to 32 new tokens at temperature 1, 16 answers per optimizer step (micro batch 8 x accumulation 2,
so 2 prompts), the same number of steps, learning rate, LoRA (r=16 on the attention projections) and fp32.
TRL runs its GRPOConfig defaults otherwise (dapo loss, beta 0, activation checkpointing on); lmtune its own
(dapo loss, beta 0, each prompt computed once for its group, padding-free training, no checkpointing).

Reported per tool: generated plus trained answer tokens per second after the first step, peak memory (max RSS
of the training process), and the mean reward of the sampled answers over the last 3 steps (run i of both tools
uses seed i, so each tool's median covers the same sampling luck; both score the
same function, the share of "thanks" among an answer's words, on fresh samples).
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

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import write_section  # noqa: E402
from run import WORK, build_model, machine, peak_memory_mb, sentence  # noqa: E402

PROMPTS, GENERATIONS, NEW_TOKENS, MICRO, ACCUM, STEPS, LR = 64, 8, 32, 8, 2, 16, 2e-3
ANSWER_WORDS = ["thanks", "good", "bad", "small", "large", "fast", "slow", "new"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
TOOLS = ("trl", "lmtune")
REWARD = '''
def thanks(completions, **kwargs):
    """The share of an answer's words that are "thanks" (the starting policy says it about 1 word in 8)."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        words = text.split()
        out.append(sum(w == "thanks" for w in words) / max(len(words), 1))
    return out
'''


def prompt_text(rng: random.Random) -> str:
    # RLVR prompts carry instructions (a system prompt, the format wanted, the problem): 100-200 words here.
    return sentence(rng, rng.randint(100, 200)) + " Answer in a few words."


def build_prompts(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [{"prompt": prompt_text(rng)} for _ in range(PROMPTS)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "reward.py").write_text(REWARD)


def build_policy(base: Path, folder: Path) -> Path:
    """The starting policy: run.py's model taught by sft (lmtune) to answer with a few of ANSWER_WORDS, in the
    tokenizer's own chat template, which both tools then apply to the prompts."""
    from lmtune.config.load import resolve
    from lmtune.engine.loop import train

    final = folder / "final"
    if (final / "model.safetensors").exists():
        return final
    rng = random.Random(1)
    rows = [{"instruction": prompt_text(rng), "output": " ".join(rng.choices(ANSWER_WORDS, k=6))} for _ in range(256)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = {"base_model": str(base), "dataset": str(folder / "sft.jsonl"), "stage": "sft", "method": "full", "epochs": 2,
              "learning_rate": 1e-3, "micro_batch_size": 8, "lr_scheduler": "constant", "validation_split_ratio": 0.0,
              "output_dir": str(folder), "cache_dir": str(folder / "cache"), "overwrite_output_dir": True, "plot_loss": False}
    train(resolve(data=values).config, quiet=True)
    return final


def child_lmtune(model: Path, data: Path, out: Path, seed: int) -> dict:
    from lmtune.config.load import resolve
    from lmtune.engine.loop import train
    from lmtune.engine.report import read_metrics

    marks: dict = {}

    def on_step(state) -> None:
        now = time.perf_counter()
        if state.global_step == 1:
            marks["first"], marks["start"], marks["tokens0"] = now - STARTED, now, state.trained_tokens
        marks["end"], marks["tokens"] = now, state.trained_tokens

    values = {
        "base_model": str(model), "dataset": str(data / "prompts.jsonl"), "stage": "grpo", "method": "lora",
        "reward_function": str(data / "reward.py") + ":thanks", "num_generations": GENERATIONS,
        "max_new_tokens": NEW_TOKENS, "top_k": 0, "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
        "max_steps": STEPS, "learning_rate": LR, "lr_scheduler": "linear", "lora_r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
        "lora_dropout": LORA["lora_dropout"], "lora_target": ["q_proj", "k_proj", "v_proj", "o_proj"], "logging_steps": 1,
        "seed": seed, "output_dir": str(out), "cache_dir": str(out / "cache"), "overwrite_output_dir": True, "plot_loss": False,
    }
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    result = train(resolved.config, quiet=True, on_step=on_step)
    rewards = [r["reward_mean"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward_mean" in r]
    tokens = 2 * (marks["tokens"] - marks["tokens0"])  # each answer token is generated once and trained once
    return {"first_step_s": marks["first"], "tokens_per_s": tokens / max(marks["end"] - marks["start"], 1e-9),
            "peak_mb": peak_memory_mb(), "reward_last3": statistics.mean(rewards[-3:]), "steps": result.steps}


def child_trl(model_dir: Path, data: Path, out: Path, seed: int) -> dict:
    import importlib.util

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = importlib.util.spec_from_file_location("reward", data / "reward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    marks: dict = {"tokens": 0, "rewards": []}

    def reward(completions, completion_ids=None, **kwargs):
        marks["tokens"] += sum(len(ids) for ids in completion_ids) if completion_ids is not None else 0
        scores = module.thanks(completions)
        marks["rewards"].append(sum(scores) / len(scores))
        return scores

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:
                marks["first"], marks["start"], marks["tokens0"] = now - STARTED, now, marks["tokens"]
            marks["end"], marks["tokens_end"] = now, marks["tokens"]

    arguments = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM, num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS, max_steps=STEPS, learning_rate=LR, lr_scheduler_type="linear", logging_steps=1000,
        save_strategy="no", report_to=[], seed=seed, bf16=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        disable_tqdm=True, temperature=1.0, top_k=0,
    )
    lora = LoraConfig(**LORA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    # Conversational prompts: TRL applies the tokenizer's chat template, as lmtune does with `template` unset.
    dataset = load_dataset("json", data_files=str(data / "prompts.jsonl"), split="train")
    dataset = dataset.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}]})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=arguments, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora, callbacks=[Timing()])
    trainer.train()
    # One reward call per generation batch of 16 answers = one optimizer step here.
    tokens = 2 * (marks["tokens_end"] - marks["tokens0"])
    return {"first_step_s": marks["first"], "tokens_per_s": tokens / max(marks["end"] - marks["start"], 1e-9),
            "peak_mb": peak_memory_mb(), "reward_last3": statistics.mean(marks["rewards"][-3:]), "steps": trainer.state.global_step}


def run_child(tool: str, model: Path, data: Path, index: int) -> dict:
    out = WORK / "runs" / f"grpo-{tool}-{index}"
    command = [sys.executable, __file__, "--child", tool, "--model", str(model), "--data", str(data), "--out", str(out),
               "--seed", str(index)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(out / "hf-datasets")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{tool} grpo failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: dict) -> str:
    lines = [
        "## GRPO (LoRA): lmtune against TRL's GRPOTrainer",
        "",
        f"Written by `python benchmarks/grpo.py`. Machine: {results['machine']}; TRL {results['trl']}.",
        f"Medians of {results['runs']} alternated runs per tool (run i of both tools samples with seed i); the ~30M-parameter Llama of run.py taught by a short sft to",
        f"answer with a few words, {PROMPTS} prompts of 100-200 words in the tokenizer's chat template, {GENERATIONS} generations",
        f"per prompt, up to {NEW_TOKENS} new tokens at temperature 1, {MICRO * ACCUM} answers per step (micro batch {MICRO} x",
        f"accumulation {ACCUM}), {STEPS} steps, lr {LR}, fp32, LoRA r=16 on attention, one reward: the share of \"thanks\" among",
        "an answer's words. TRL runs its GRPOConfig defaults otherwise (dapo loss, beta 0, activation checkpointing);",
        "lmtune its own (dapo, beta 0, each prompt computed once per group, padding-free training, no checkpointing).",
        "Tokens/s: generated plus trained answer tokens after the first step. Reward: mean over the last 3 steps' samples.",
        "",
        "| tool | answer tokens/s | peak MB | first step s | reward (last 3 steps) |",
        "|---|---:|---:|---:|---:|",
    ]
    for tool in TOOLS:
        m = results["median"][tool]
        lines.append(f"| {tool} | {m['tokens_per_s']:.0f} | {m['peak_mb']:.0f} | {m['first_step_s']:.1f} | {m['reward_last3']:.3f} |")
    r = results["ratio"]["lmtune"]
    lines.append(f"| **lmtune / trl** | **{r['tokens_per_s']:.2f}x** | **{r['peak_mb']:.2f}x** | **{r['first_step_s']:.2f}x** | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=TOOLS)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_policy:
        build_policy(Path(args.model), Path(args.out))
        return
    if args.child:
        where = (Path(args.model), Path(args.data), Path(args.out))
        print(json.dumps(child_trl(*where, args.seed) if args.child == "trl" else child_lmtune(*where, args.seed)))
        return
    import trl

    base, data = WORK / "model-30m", WORK / "grpo-prompts"
    build_model(base)
    build_prompts(data)
    # In a process of its own: a child's peak memory counts its parent's at the fork (Linux keeps ru_maxrss).
    policy = WORK / "grpo-policy"
    subprocess.run([sys.executable, __file__, "--build-policy", "--model", str(base), "--out", str(policy)], check=True)
    model = policy / "final"
    runs: dict = {tool: [] for tool in TOOLS}
    for index in range(args.runs):
        for tool in TOOLS if index % 2 == 0 else TOOLS[::-1]:
            outcome = run_child(tool, model, data, index)
            runs[tool].append(outcome)
            print(f"  {tool:7s} run {index + 1}: {outcome['tokens_per_s']:7.0f} tok/s  peak {outcome['peak_mb']:6.0f} MB  "
                  f"first step {outcome['first_step_s']:5.1f}s  reward {outcome['reward_last3']:.3f}", flush=True)
    keys = ("tokens_per_s", "peak_mb", "first_step_s", "reward_last3")
    median = {tool: {k: statistics.median(r[k] for r in runs[tool]) for k in keys} for tool in TOOLS}
    ratio = {"lmtune": {k: median["lmtune"][k] / max(median["trl"][k], 1e-9) for k in keys}}
    results = {"machine": machine(), "trl": trl.__version__, "runs": args.runs, "median": median, "ratio": ratio, "all": runs}
    (Path(__file__).resolve().parent / "results-grpo.json").write_text(json.dumps(results, indent=2))
    write_section("grpo", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
