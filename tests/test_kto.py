"""kto: the loss against an independent computation, learning from unpaired labelled answers, its data and refusals."""

import json
import math
import random

import pytest
import torch

from lmtune.cli import main
from lmtune.config.load import resolve
from lmtune.engine.loop import train
from lmtune.engine.report import read_metrics
from test_alignment import heldout_preference, preference_rows


def unpaired_rows(n, seed=0):
    """TRL's unpaired format: each preference pair becomes two rows, a desirable and an undesirable answer."""
    rows = []
    for pair in preference_rows(n, seed):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    random.Random(seed).shuffle(rows)
    return rows


def kto_config(tmp_path, method="lora", rows=None, **settings):
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows or unpaired_rows(120))))
    values = {
        "base_model": "builtin:tiny", "dataset": str(data), "template": "chatml", "stage": "kto", "method": method,
        "micro_batch_size": 8, "epochs": 2, "learning_rate": 3e-3 if method == "full" else 1e-2, "lr_scheduler": "constant",
        "validation_split_ratio": 0.0, "logging_steps": 1, "seed": 0, "lora_r": 8, "lora_dropout": 0.0, "pref_beta": 0.1,
        "output_dir": str(tmp_path / f"kto-{method}"), "cache_dir": str(tmp_path / "cache"), "plot_loss": False,
    }
    values.update(settings)
    resolved = resolve(data=values)
    assert not resolved.errors, resolved.errors
    return resolved.config


# -- the loss on a fixed batch, computed independently ----------------------------------------------


def answer_logp(model, prompt_ids, answer_ids):
    """log pi(answer | prompt) in float64, from a plain forward over the whole sequence."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model.double()(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return float(logits[-len(answer_ids):].gather(1, targets[-len(answer_ids):, None]).sum())


@pytest.mark.parametrize("packing", [True, False])
def test_kto_loss_equals_the_formula_computed_apart(tmp_path, packing):
    from lmtune.data.pipeline import prepare
    from lmtune.model.load import load_model, load_tokenizer
    from lmtune.model.packed_attention import switch_to_packed
    from lmtune.stages import objective_for
    from lmtune.stages.reference import Reference
    from types import SimpleNamespace

    beta, wd, wu = 0.3, 1.5, 0.7
    config = kto_config(tmp_path, "full", pref_beta=beta, desirable_weight=wd, undesirable_weight=wu)
    tokenizer = load_tokenizer(config)
    examples = prepare(config, tokenizer, 2048).train[:5]
    policy, reference = load_model(config), load_model(config)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    switch_to_packed(policy, packing)
    objective = objective_for(config)
    objective.reference = Reference(reference, "full", SimpleNamespace(place_frozen=lambda frozen: frozen))
    batches = objective.batches(examples, config, tokenizer, shuffle=False, packing=packing)
    batch = next(batches.epoch(0))
    summed, metrics = objective.summed_loss(policy, batch)

    # Independently: split each example into prompt and answer, pair prompt i with the answer of example i + 1.
    def parts(e):
        cut = next(i for i, label in enumerate(e["labels"]) if label != -100)
        return list(e["input_ids"][:cut]), list(e["input_ids"][cut:])

    split = [parts(e) for e in examples]
    ratios, kls = [], []
    for i, (prompt, answer) in enumerate(split):
        other = split[(i + 1) % len(split)][1]
        ratios.append(answer_logp(policy, prompt, answer) - answer_logp(reference, prompt, answer))
        kls.append(answer_logp(policy, prompt, other) - answer_logp(reference, prompt, other))
    z0 = max(0.0, sum(kls) / len(kls))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum(
        wd * (1 - sigmoid(beta * r - beta * z0)) if e["label"][0] else wu * (1 - sigmoid(beta * z0 - beta * r))
        for r, e in zip(ratios, examples)
    )
    assert {bool(e["label"][0]) for e in examples} == {True, False}
    assert float(summed.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(metrics["kl"]) / len(examples) == pytest.approx(z0, rel=1e-4, abs=1e-6)
    desirable = [beta * r for r, e in zip(ratios, examples) if e["label"][0]]
    assert float(metrics["rewards/desirable"]) == pytest.approx(sum(desirable), rel=1e-4, abs=1e-6)


# -- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "full"])
def test_kto_raises_heldout_desirable_answers_over_undesirable_ones(tmp_path, method):
    result = train(kto_config(tmp_path, method), quiet=True)
    records = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert {"kl", "rewards/desirable", "rewards/undesirable", "reward_margin", "answers_per_second"} <= set(records[-1])
    assert records[-1]["loss"] < records[0]["loss"]
    heldout = preference_rows(40, seed=99)
    accuracy, margin = heldout_preference(result.final_dir, heldout)
    assert accuracy >= 0.75 and margin > 0, (accuracy, margin)  # the starting policy is at 0.5 and 0 by definition


def test_precomputed_reference_gives_the_same_curve_as_a_frozen_copy(tmp_path):
    frozen = train(kto_config(tmp_path, "full", epochs=1, output_dir=str(tmp_path / "frozen")), quiet=True)
    stored = train(kto_config(tmp_path, "full", epochs=1, output_dir=str(tmp_path / "stored"), precompute_ref_logps=True), quiet=True)
    curve = lambda run: [r["loss"] for r in read_metrics(run.run_dir / "metrics.jsonl") if "loss" in r]  # noqa: E731
    assert curve(stored) == pytest.approx(curve(frozen), rel=1e-4)
    assert list((tmp_path / "cache").rglob("ref_logps-*.json"))


def test_llamafactory_conversations_with_kto_tag_are_read(tmp_path):
    from lmtune.data.pipeline import load_records

    rows = [
        {"messages": [{"role": "user", "content": "Say thanks."}, {"role": "assistant", "content": "thanks"}], "tag": True},
        {"messages": [{"role": "user", "content": "Say thanks."}, {"role": "assistant", "content": "red"}], "tag": "false"},
    ]
    config = kto_config(tmp_path, rows=rows, dataset_columns={"kto_tag": "tag"})
    train_records, _, summary = load_records(config)
    assert summary.formats == {"unpaired": 2}
    assert [(r["completion"], r["label"]) for r in train_records] == [("thanks", True), ("red", False)]
    assert train_records[0]["messages"] == [{"role": "user", "content": "Say thanks."}]


def test_convert_maps_a_llamafactory_kto_config_that_check_accepts(tmp_path, capsys):
    info = {"kto_demo": {"file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}], "label": lab}
            for a, lab in (("hello", True), ("go away", False))]
    (tmp_path / "kto.json").write_text(json.dumps(rows))
    source = tmp_path / "qwen3_lora_kto.yaml"
    source.write_text(
        "model_name_or_path: builtin:tiny\nstage: kto\nfinetuning_type: lora\npref_beta: 0.1\nkto_chosen_weight: 1.2\n"
        "dataset: kto_demo\ntemplate: chatml\ncutoff_len: 256\noutput_dir: out\n"
    )
    assert main(["convert", str(source), "--dataset-info", str(tmp_path / "dataset_info.json"), "-o", str(tmp_path / "ours.yaml")]) == 0
    converted = (tmp_path / "ours.yaml").read_text()
    assert "stage: kto" in converted and "desirable_weight: 1.2" in converted and "unpaired" in converted
    capsys.readouterr()
    assert main(["check", str(tmp_path / "ours.yaml")]) == 0, capsys.readouterr()


def test_axolotl_rl_kto_names_are_read():
    resolved = resolve(data={"rl": "kto", "rl_beta": 0.2, "kto_desirable_weight": 1.3, "kto_undesirable_weight": 0.9})
    f = resolved.config.finetuning
    assert (f.stage, f.pref_beta, f.desirable_weight, f.undesirable_weight) == ("kto", 0.2, 1.3, 0.9)


def test_dpo_settings_kto_ignores_are_named(tmp_path):
    resolved = resolve(data={"stage": "kto", "pref_loss": "ipo", "ppo_epochs": 2})
    lines = [str(p) for p in resolved.problems]
    assert "warning: pref_loss: ignored with stage: kto; it applies to dpo" in lines, lines
    assert "warning: ppo_epochs: ignored with stage: kto; it applies to ppo" in lines, lines
    resolved = resolve(data={"stage": "dpo", "desirable_weight": 2.0})
    assert "warning: desirable_weight: ignored with stage: dpo; it applies to kto" in [str(p) for p in resolved.problems]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_eval_of_a_kto_run_compares_with_the_starting_policy(tmp_path, capsys, method):
    """`lmtune eval` on a kto run gives the loss its training logged last (the reference: the base again)."""
    import yaml

    config = kto_config(tmp_path, method, epochs=1, validation_split_ratio=0.25, eval_strategy="epoch")
    result = train(config, quiet=True)
    path = tmp_path / "kto.yaml"
    path.write_text(yaml.safe_dump(config.flat()))
    assert main(["eval", str(path), "--checkpoint", str(result.run_dir)]) == 0
    out = capsys.readouterr().out
    reported = float(out.split("eval_loss: ")[1].split()[0])
    assert reported == pytest.approx(result.eval_loss, abs=1e-4)
    assert "eval_reward_margin" in out
