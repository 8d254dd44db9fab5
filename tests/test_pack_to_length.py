"""pack_to_length: rows filled with whole examples up to a length (Axolotl sample_packing, torchtune packed)."""

import json

import pytest
import torch

from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data.batches import IGNORE, Batches, pack_rows
from lmtune.data.pipeline import prepare
from lmtune.engine.report import read_metrics
from lmtune.model.load import context_length, load_model, load_model_config, load_tokenizer
from test_train import make_config, run


def short_rows(n=48):
    return [{"instruction": "q " * (1 + i % 5), "output": "a " * (1 + 2 * (i % 4))} for i in range(n)]


def test_rows_hold_every_example_once_and_never_overflow():
    lengths = [(7 * i) % 61 + 3 for i in range(500)]
    rows = pack_rows(lengths, 128, seed=5)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert pack_rows(lengths, 128, seed=5) == rows  # fixed by the seed
    assert pack_rows(lengths, 128, seed=6) != rows
    fill = sum(lengths) / (len(rows) * 128)
    assert fill > 0.95, fill  # first fit on shuffled lengths leaves little room empty


def test_each_step_trains_a_row_of_examples_and_its_loss_is_theirs(tmp_path):
    path = make_config(tmp_path, rows=short_rows(), method="full", micro_batch_size=1, max_steps=-1, epochs=1,
                       max_input_length=256, pack_to_length=True)
    config = load_config(path)
    tokenizer = load_tokenizer(config)
    data = prepare(config, tokenizer, context_length(load_model_config(config)), tmp_path)
    batches = Batches(data.train, 1, tokenizer.pad_token_id, packing=True, pack_length=256, seed=config.training.seed)
    assert len(batches.rows) < len(data.train) / 4  # several examples per step

    # The first step's loss, computed here example by example (unpacked, the model's own attention).
    model = load_model(config)
    first = next(batches.epoch(0))
    bounds = first["cu_seq_lens"].tolist()
    assert first["input_ids"].shape[1] <= 256 and len(bounds) - 1 >= 4
    summed, tokens = 0.0, 0
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            ids, labels = first["input_ids"][:, start:end], first["labels"][:, start:end].clone()
            logits = model(input_ids=ids).logits[0, :-1]
            targets = labels[0, 1:]
            keep = targets != IGNORE
            summed += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            tokens += int(keep.sum())

    result = run(path)
    assert result.steps == len(batches.rows)  # one step per packed row
    logged = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert logged[0]["loss"] == pytest.approx(summed / tokens, rel=1e-5)
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_data_and_train_report_examples_per_step_and_fill(tmp_path, capsys):
    path = make_config(tmp_path, rows=short_rows(), micro_batch_size=2, gradient_accumulation_steps=2, max_input_length=128,
                       pack_to_length=True, max_steps=1)
    assert main(["data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "packed to 128 tokens per row: 48 examples in" in out and "examples per step" in out and "filled" in out
    assert main(["train", str(path)]) == 0
    assert "packed to 128 tokens per row" in capsys.readouterr().out


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"pack_to_length": True, "packing": False}, "error: pack_to_length: rows packed to a length are laid out without padding"),
        ({"pack_to_length": True, "stage": "dpo"}, "error: pack_to_length: rows packed to a length are for pt and sft, not dpo"),
    ],
)
def test_pack_to_length_where_it_cannot_apply_is_one_line(tmp_path, capsys, settings, message):
    path = make_config(tmp_path, **settings)
    assert main(["check", str(path)]) == 1
    assert message in capsys.readouterr().out


def test_other_tools_keys_for_packing_to_a_length(tmp_path):
    path = tmp_path / "axolotl.yaml"
    (tmp_path / "d.jsonl").write_text(json.dumps(short_rows(1)[0]) + "\n")
    path.write_text(json.dumps({"base_model": "builtin:tiny", "sample_packing": True, "sequence_len": 512,
                                "datasets": [{"path": str(tmp_path / "d.jsonl"), "type": "alpaca"}]}))
    config = load_config(path)
    assert config.data.pack_to_length is True and config.data.max_input_length == 512
