"""Offline alignment chains on synthetic data built here: sft -> rm -> ppo, and sft -> dpo.

    python examples/align/chain.py [--out runs/align] [--quick]

The task: asked to "Say some words.", answer with words, and (the preference
the later stages teach) say "thanks" often. sft teaches the words; rm learns
from pairs that answers with "thanks" are preferred; ppo raises the share of
"thanks" with that reward model; dpo learns the same preference from the
pairs directly. Each stage starts from the sft model, as a real chain does,
and every step is an ordinary `lmtune train` of the config written beside it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ["thanks", "good", "bad", "small", "large", "fast", "slow", "new"]


def write_data(folder: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sft = [{"instruction": "Say some words.", "output": " ".join(rng.choices(WORDS, k=6))} for _ in range(200)]
    pairs = []
    for _ in range(200):
        filler = rng.choices(WORDS[1:], k=4)
        with_thanks = list(filler)
        with_thanks[rng.randrange(4)] = "thanks"
        pairs.append({"prompt": "Say some words.", "chosen": " ".join(with_thanks), "rejected": " ".join(filler)})
    (folder / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))


def configs(out: Path, quick: bool) -> dict[str, dict]:
    data, sft_model = out / "data", str(out / "sft" / "final")
    common = {"template": "chatml", "micro_batch_size": 8, "lr_scheduler": "constant", "cache_dir": str(out / "cache"), "overwrite_output_dir": True}
    steps = (lambda n: {"max_steps": 2}) if quick else (lambda n: {"max_steps": n})
    return {
        "sft": {**common, "base_model": "builtin:tiny", "stage": "sft", "method": "full", "dataset": str(data / "words.jsonl"),
                "learning_rate": 3e-3, "epochs": 3, "validation_split_ratio": 0.0, **({"max_steps": 2} if quick else {})},
        "rm": {**common, "base_model": sft_model, "stage": "rm", "method": "lora", "dataset": str(data / "pairs.jsonl"),
               "learning_rate": 1e-2, "epochs": 2, **({"max_steps": 2} if quick else {})},
        "ppo": {**common, "base_model": sft_model, "stage": "ppo", "method": "lora", "dataset": str(data / "words.jsonl"),
                "reward_model": str(out / "rm"), "learning_rate": 3e-3, "lora_r": 32, "lora_alpha": 64, "max_new_tokens": 8,
                "ppo_buffer_size": 4, "validation_split_ratio": 0.2, "eval_strategy": "steps", "eval_steps": 12, **steps(24)},
        "dpo": {**common, "base_model": sft_model, "stage": "dpo", "method": "lora", "dataset": str(data / "pairs.jsonl"),
                "learning_rate": 5e-3, "pref_beta": 0.1, "epochs": 2, **({"max_steps": 2} if quick else {})},
    }


def main() -> None:
    import yaml

    from lmtune.cli import main as lmtune

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/align")
    parser.add_argument("--quick", action="store_true", help="two steps per stage: checks the chain, teaches nothing")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    write_data(out / "data")
    for stage, values in configs(out, args.quick).items():  # sft first: the others start from it
        path = out / f"{stage}.yaml"
        path.write_text(yaml.safe_dump({**values, "output_dir": str(out / stage)}, sort_keys=False))
        print(f"== {stage}: lmtune train {path}")
        if lmtune(["train", str(path)]) != 0:
            raise SystemExit(f"{stage} failed; see the message above")
    print(f"done: sft, rm, ppo and dpo runs are in {out}; compare with `lmtune chat {out / 'ppo'} --prompt 'Say some words.'`")


if __name__ == "__main__":
    main()
