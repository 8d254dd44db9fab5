"""Reinforcement learning with verifiable rewards, offline: sft to a partial skill, then grpo on exact match.

    python examples/rlvr/walkthrough.py [--out runs/rlvr] [--quick]

The task: "What is 27 + 45?" answered with the number. The sft data comes from a careless teacher: on sums
that carry (7 + 5 = 12), it forgets the carry in 60% of its answers (27 + 45 = 62), as imperfect demonstrations
do. sft on 1,000 such examples teaches builtin:small the format, the arithmetic, and the teacher's habit;
grpo then samples 8 answers per prompt and rewards exactly the right number (the built-in `exact_match`
reward against each row's `answer` column, which holds the true sum), so the model learns from its own
attempts which of its habits are wrong, with no reference answer in the loss. Held-out exact-match accuracy
(greedy answers to sums it never saw) is printed before training, after sft and after grpo. Each stage is
an ordinary `lmtune train` of the config written beside it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def sums(seed: int) -> list[tuple[int, int]]:
    """Every sum of two numbers from 10 to 49, in a seeded order."""
    pairs = [(a, b) for a in range(10, 50) for b in range(10, 50)]
    random.Random(seed).shuffle(pairs)
    return pairs


def rows(pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    return [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]


def careless(examples: list[dict[str, str]], seed: int) -> list[dict[str, str]]:
    """The teacher's answers: the carry forgotten in 60% of the sums that carry."""
    rng = random.Random(seed)
    out = []
    for row in examples:
        a, b = (int(n) for n in row["prompt"].removeprefix("What is ").removesuffix("?").split(" + "))
        wrong = (a % 10 + b % 10) >= 10 and rng.random() < 0.6
        out.append({**row, "answer": str(a + b - 10) if wrong else row["answer"]})
    return out


def configs(out: Path, quick: bool) -> dict[str, dict]:
    data = out / "data"
    common = {"template": "chatml", "lr_scheduler": "constant", "cache_dir": str(out / "cache"), "overwrite_output_dir": True,
              "seed": 0, "logging_steps": 5}
    # sft at 5e-4: at 1e-3 the run could stall at a loss near 0.7 (seeds 0 and 1 on an AMD CPU: 12.5% and 5.5% held
    # out; seed 2 there, and seed 0 on an Intel one, reached 54-58%), so the outcome hung on the CPU's rounding. At
    # 5e-4 seeds 0-4 all reached 51.5-60% there.
    return {
        "sft": {**common, "base_model": "builtin:small", "stage": "sft", "method": "full", "dataset": str(data / "sft.jsonl"),
                "dataset_columns": {"response": "answer"}, "learning_rate": 5e-4, "micro_batch_size": 16, "lr_scheduler": "cosine",
                "warmup_ratio": 0.05, "validation_split_ratio": 0.0, "epochs": 10, **({"max_steps": 2} if quick else {})},
        "grpo": {**common, "base_model": str(out / "sft" / "final"), "stage": "grpo", "method": "full",
                 "dataset": str(data / "grpo.jsonl"), "reward_function": ["exact_match"], "num_generations": 8,
                 "micro_batch_size": 16, "gradient_accumulation_steps": 4, "max_new_tokens": 6, "temperature": 0.8, "top_k": 0,
                 "learning_rate": 3e-5, "epsilon_high": 0.28, "validation_split_ratio": 0.0, "max_steps": 2 if quick else 300},
    }


def accuracy(model_dir: Path, held_out: list[dict[str, str]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.generate import answer
    from lmtune.model.load import model_location

    folder = model_location(str(model_dir))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in held_out]
    answers = []
    for start in range(0, len(prompts), 50):
        answers += answer(model, tokenizer, prompts[start : start + 50], "chatml", max_new_tokens=6)
    return sum(a.strip() == r["answer"] for a, r in zip(answers, held_out)) / len(held_out)


def main() -> None:
    import yaml

    from lmtune.cli import main as lmtune

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/rlvr")
    parser.add_argument("--quick", action="store_true", help="two steps per stage: a smoke run")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    # 1,600 sums: 200 held out, 1,000 for sft (the teacher's answers), the other 400 as grpo's prompts (their true
    # answers only reach the reward).
    pairs = sums(seed=0)
    held_out, sft, grpo = rows(pairs[:200]), careless(rows(pairs[200:1200]), seed=1), rows(pairs[1200:])
    (out / "data" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (out / "data" / "grpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grpo))
    scores = {"start": accuracy(Path("builtin:small"), held_out)}
    for stage, settings in configs(out, args.quick).items():
        path = out / f"{stage}.yaml"
        path.write_text(yaml.safe_dump({**settings, "output_dir": str(out / stage)}, sort_keys=False))
        print(f"== {stage}: lmtune train {path}", flush=True)
        if lmtune(["train", str(path)]) != 0:
            raise SystemExit(f"{stage} failed")
        scores[stage] = accuracy(out / stage / "final", held_out)
    print("held-out exact-match accuracy on 200 sums never seen in training:")
    for stage, value in scores.items():
        print(f"  {stage:6s} {value:.1%}")
    (out / "accuracy.json").write_text(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main()
