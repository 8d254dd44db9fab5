"""rm and dpo: losses against hand-computed values, learning on synthetic preference tasks, outputs, resume."""

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from lmtune.config.load import resolve
from lmtune.engine.loop import train
from lmtune.engine.report import read_metrics
from lmtune.stages.preference import PairLogps, pair_losses

WORDS = ["red", "blue", "green", "black", "white", "small", "large", "fast"]


def preference_rows(n, seed=0):
    """The chosen answer ends with the requested word ("thanks"); the rejected one with another word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        wanted, other = "thanks", rng.choice(WORDS)
        filler = " ".join(rng.choice(["the", "a", "one", "it", "is"]) for _ in range(rng.randint(1, 3)))
        rows.append({
            "prompt": f"Say {wanted}.",
            "chosen": f"{filler} {wanted}",
            "rejected": f"{filler} {other}",
        })
    return rows


def run_config(tmp_path, stage, method, rows=None, **settings):
    data = tmp_path / "pairs.jsonl"
    if rows is not None or not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in (rows or preference_rows(160))))
    values = {
        "base_model": "builtin:tiny", "dataset": str(data), "template": "chatml", "stage": stage, "method": method,
        "micro_batch_size": 8, "epochs": 3, "learning_rate": 3e-3 if method == "full" else 1e-2, "lr_scheduler": "constant",
        "validation_split_ratio": 0.2, "eval_strategy": "epoch", "logging_steps": 1, "seed": 0, "lora_r": 8,
        "output_dir": str(tmp_path / f"{stage}-{method}"), "cache_dir": str(tmp_path / "cache"), "plot_loss": False,
    }
    values.update(settings)
    if values["validation_split_ratio"] == 0.0:
        values["eval_strategy"] = "no"
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    return resolved.config


# -- losses on a fixed batch of log-probabilities -------------------------------------------------

POLICY = PairLogps(torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([5, 2]), torch.tensor([4, 3]))
REFERENCE = PairLogps(torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -3.5]), torch.tensor([5, 2]), torch.tensor([4, 3]))
BETA = 0.5


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def by_hand(kind):
    out = []
    for i in range(2):
        pc, pr = float(POLICY.chosen[i]), float(POLICY.rejected[i])
        rc, rr = float(REFERENCE.chosen[i]), float(REFERENCE.rejected[i])
        nc, nr = float(POLICY.chosen_tokens[i]), float(POLICY.rejected_tokens[i])
        x = (pc - pr) - (rc - rr)
        if kind == "sigmoid":
            out.append(-logsigmoid(BETA * x))
        elif kind == "hinge":
            out.append(max(0.0, 1 - BETA * x))
        elif kind == "ipo":
            out.append(((pc / nc - pr / nr) - (rc / nc - rr / nr) - 1 / (2 * BETA)) ** 2)
        elif kind == "orpo":
            ac, ar = pc / nc, pr / nr
            log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
            out.append(-ac - BETA * logsigmoid(log_odds))
        elif kind == "simpo":
            out.append(-logsigmoid(BETA * (pc / nc - pr / nr) - 0.3))
    return out


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "ipo", "orpo", "simpo"])
def test_preference_loss_matches_the_formula(kind):
    loss, chosen, rejected = pair_losses(kind, BETA, POLICY, REFERENCE, simpo_gamma=0.3)
    assert torch.allclose(loss, torch.tensor(by_hand(kind)), atol=1e-5), (loss, by_hand(kind))


def test_label_smoothing_and_ftx():
    smoothed, _, _ = pair_losses("sigmoid", BETA, POLICY, REFERENCE, label_smoothing=0.1)
    x = float((POLICY.chosen[0] - POLICY.rejected[0]) - (REFERENCE.chosen[0] - REFERENCE.rejected[0]))
    assert float(smoothed[0]) == pytest.approx(-0.9 * logsigmoid(BETA * x) - 0.1 * logsigmoid(-BETA * x), abs=1e-5)
    plain, _, _ = pair_losses("sigmoid", BETA, POLICY, REFERENCE)
    with_ftx, _, _ = pair_losses("sigmoid", BETA, POLICY, REFERENCE, ftx=2.0)
    assert torch.allclose(with_ftx - plain, 2.0 * -(POLICY.chosen / POLICY.chosen_tokens), atol=1e-5)


def test_rewards_are_beta_times_the_log_ratio():
    _, chosen, rejected = pair_losses("sigmoid", BETA, POLICY, REFERENCE)
    assert torch.allclose(chosen, BETA * (POLICY.chosen - REFERENCE.chosen))
    assert torch.allclose(rejected, BETA * (POLICY.rejected - REFERENCE.rejected))


# -- rm ------------------------------------------------------------------------------------------


def final_eval(result, key):
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if key in r]
    return evals[-1][key]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_model_learns_the_visible_preference(tmp_path, method, capsys):
    from lmtune.cli import main

    result = train(run_config(tmp_path, "rm", method), quiet=True)
    assert final_eval(result, "eval_pair_accuracy") >= 0.9
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "pair_accuracy" in r]
    assert records and "reward_margin" in records[0] and "pairs_per_second" in records[0]
    # `lmtune score` reads the run the same way: fresh pairs, rendered with the run's template
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(40, seed=7)))
    capsys.readouterr()
    assert main(["score", str(result.run_dir), "--file", str(fresh)]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(scored) == 40 and sum(r["chosen_wins"] for r in scored) >= 36
    assert main(["score", str(result.run_dir), "--prompt", "Say thanks.", "--answer", "the thanks"]) == 0
    high = float(capsys.readouterr().out)
    assert main(["score", str(result.run_dir), "--prompt", "Say thanks.", "--answer", "the blue"]) == 0
    assert high > float(capsys.readouterr().out)
    assert main(["score", str(result.run_dir), "--text", "anything at all"]) == 0
    float(capsys.readouterr().out)
    assert main(["score", str(result.run_dir)]) == 1
    assert "give one of --text" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    assert main(["score", str(result.run_dir), "--file", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl line 1: a row needs `text`" in capsys.readouterr().err


def test_full_reward_model_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = train(run_config(tmp_path, "rm", "full", epochs=1), quiet=True)
    model = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir)
    assert model.config.num_labels == 1
    batch = tokenizer(["one two", "three four five six"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 1)


def test_lora_reward_model_is_an_adapter_with_its_head(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lmtune.model.load import model_location

    result = train(run_config(tmp_path, "rm", "lora", epochs=1), quiet=True)
    config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    base = AutoModelForSequenceClassification.from_pretrained(model_location("builtin:tiny"), num_labels=1)
    model = PeftModel.from_pretrained(base, result.final_dir)
    trained_head = [n for n, _ in model.named_parameters() if "score" in n and "modules_to_save" in n]
    assert trained_head


# -- dpo -----------------------------------------------------------------------------------------


def heldout_preference(final_dir, rows, base=None):
    """Share of held-out pairs where the model gives the chosen answer the higher log-probability
    than the starting model does (the implicit reward's sign), and the mean implicit margin."""
    from lmtune.model.load import model_location

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def logps(model, tokenizer, prompt, answer):
        text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[tokenizer.bos_token_id] + p + a])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        return float(logits[-len(a):].gather(1, targets[-len(a):, None]).sum())

    tokenizer = AutoTokenizer.from_pretrained(model_location("builtin:tiny"))
    start = AutoModelForCausalLM.from_pretrained(model_location("builtin:tiny"))
    if (final_dir / "adapter_config.json").exists():
        from peft import PeftModel

        trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_location("builtin:tiny")), final_dir)
    else:
        trained = AutoModelForCausalLM.from_pretrained(final_dir)
    wins, margins = 0, []
    for row in rows:
        margin = (logps(trained, tokenizer, row["prompt"], row["chosen"]) - logps(start, tokenizer, row["prompt"], row["chosen"])) - (
            logps(trained, tokenizer, row["prompt"], row["rejected"]) - logps(start, tokenizer, row["prompt"], row["rejected"])
        )
        margins.append(margin)
        wins += margin > 0
    return wins / len(rows), sum(margins) / len(margins)


@pytest.mark.parametrize("method,settings", [("lora", {}), ("full", {}), ("full", {"precompute_ref_logps": True})])
def test_dpo_raises_the_margin_and_heldout_preference(tmp_path, method, settings):
    result = train(run_config(tmp_path, "dpo", method, epochs=2, **settings), quiet=True)
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward_margin" in r]
    assert records[-1]["reward_margin"] > records[0]["reward_margin"]
    assert {"rewards/chosen", "rewards/rejected", "reward_accuracy"} <= set(records[0])
    heldout = preference_rows(40, seed=99)
    accuracy, margin = heldout_preference(result.final_dir, heldout)
    assert accuracy >= 0.75 and margin > 0, (accuracy, margin)  # the starting policy is at 0.5 and 0 by definition


@pytest.mark.parametrize("kind", ["ipo", "hinge", "orpo", "simpo"])
def test_every_preference_loss_trains(tmp_path, kind):
    result = train(run_config(tmp_path, "dpo", "lora", pref_loss=kind, epochs=1, validation_split_ratio=0.0, eval_strategy="no"), quiet=True)
    curve = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert all(math.isfinite(v) for v in curve) and curve[-1] < curve[0], curve


def test_useless_pairs_are_dropped_and_counted(tmp_path):
    from lmtune.data.pipeline import prepare
    from lmtune.model.load import load_tokenizer

    rows = preference_rows(10) + [
        {"prompt": "Say red.", "chosen": "red", "rejected": "red"},
        {"prompt": "Say red.", "chosen": "", "rejected": "blue"},
    ]
    config = run_config(tmp_path, "dpo", "lora", rows=rows, validation_split_ratio=0.0)
    summary = prepare(config, load_tokenizer(config), 2048).summary
    assert summary.outcomes["dropped: chosen equals rejected"] == 1
    assert summary.outcomes["dropped: chosen or rejected answer is empty"] == 1
    assert summary.train_examples == 10


def test_no_usable_pair_names_the_first_row(tmp_path):
    from lmtune.data.pipeline import prepare
    from lmtune.data.records import DataError
    from lmtune.model.load import load_tokenizer

    rows = [{"prompt": "Say red.", "chosen": "red", "rejected": "red"}] * 3
    config = run_config(tmp_path, "dpo", "lora", rows=rows, validation_split_ratio=0.0)
    with pytest.raises(DataError, match="pairs.jsonl line 1 .chosen equals rejected"):
        prepare(config, load_tokenizer(config), 2048)


def test_margin_column_reaches_the_rm_loss(tmp_path):
    from lmtune.data.pipeline import prepare
    from lmtune.model.load import load_tokenizer
    from lmtune.stages.reward import RewardModel

    rows = [dict(r, margin=1.5) for r in preference_rows(8)]
    config = run_config(tmp_path, "rm", "lora", rows=rows, validation_split_ratio=0.0)
    tokenizer = load_tokenizer(config)
    examples = prepare(config, tokenizer, 2048).train
    batch = next(RewardModel().batches(examples, config, tokenizer, shuffle=False, packing=True).epoch(0))
    assert torch.equal(batch["margin"], torch.full((8,), 1.5))


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_packed_and_padded_pairs_give_the_same_loss(tmp_path, stage):
    from lmtune.data.pipeline import prepare
    from lmtune.model.load import load_model, load_tokenizer
    from lmtune.model.packed_attention import use_packed_attention
    from lmtune.stages import objective_for, stage_of
    from lmtune.stages.reference import Reference

    config = run_config(tmp_path, stage, "full", validation_split_ratio=0.0)
    tokenizer = load_tokenizer(config)
    examples = prepare(config, tokenizer, 2048).train[:6]
    the_stage = objective_for(config)
    model = load_model(config, head=stage_of(config).head)
    if stage == "dpo":
        the_stage.reference = Reference(load_model(config), "full", SimpleNamespace(place_frozen=lambda frozen: frozen))
    padded = next(the_stage.batches(examples, config, tokenizer, shuffle=False, packing=False).epoch(0))
    loss_padded, _ = the_stage.summed_loss(model, padded)
    use_packed_attention(model)
    packed = next(the_stage.batches(examples, config, tokenizer, shuffle=False, packing=True).epoch(0))
    loss_packed, _ = the_stage.summed_loss(model, packed)
    assert torch.allclose(loss_packed, loss_padded, rtol=1e-5), (float(loss_packed), float(loss_padded))


@pytest.mark.parametrize("stage,method", [("rm", "lora"), ("rm", "full"), ("dpo", "lora"), ("dpo", "full")])
def test_kill_and_resume_reproduce_the_uninterrupted_curve(tmp_path, stage, method):
    from safetensors.torch import load_file

    settings = dict(max_steps=8, save_steps=3, epochs=1, validation_split_ratio=0.0)
    rows = preference_rows(64)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = train(run_config(tmp_path / "a", stage, method, rows=rows, **settings), quiet=True)

    class Killed(Exception):
        pass

    def kill_at_7(state):
        if state.global_step == 7:
            raise Killed

    config = run_config(tmp_path / "b", stage, method, rows=rows, **settings)
    with pytest.raises(Killed):
        train(config, quiet=True, on_step=kill_at_7)
    resumed = train(config, resume="latest", quiet=True)

    def curve(run):
        keys = ("step", "loss", "pair_accuracy" if stage == "rm" else "reward_margin")
        return [tuple(r[k] for k in keys) for r in read_metrics(run.run_dir / "metrics.jsonl")]

    assert curve(straight) == curve(resumed) and len(curve(straight)) == 8
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_reference_log_probabilities_live_with_the_data_cache(tmp_path):
    settings = dict(precompute_ref_logps=True, max_steps=2, epochs=1, validation_split_ratio=0.0, overwrite_output_dir=True)
    config = run_config(tmp_path, "dpo", "full", **settings)

    def losses():
        result = train(config, quiet=True)
        return [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl")]

    first = losses()
    stored = list((tmp_path / "cache").rglob("ref_logps-*.json"))
    assert len(stored) == 1
    values = json.loads(stored[0].read_text())
    assert len(values) == 1 and len(values[0]) == 160 and all(len(pair) == 2 for pair in values[0])
    assert losses() == first  # read back: the same run
    stored[0].write_text(json.dumps([[[0.0, 0.0]] * 160]))  # proof that the file is what training reads
    assert losses() != first
