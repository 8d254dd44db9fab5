"""`streaming: true`: rows tokenised as training reaches them, in file order; the same examples as the cache
gives, validation from the head, weighted interleaving, and a resume that continues at the same example."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.data.pipeline import prepare
from lmtune.data.stream import Stream

from test_data_pipeline import alpaca_rows, config_for, write_rows
from test_train import losses, make_config, run


def ids(examples):
    return [list(map(int, e["input_ids"])) for e in examples]


def test_a_stream_gives_the_cached_examples_in_file_order_and_starts_again_at_its_end(tmp_path, tokenizer):
    cached = prepare(config_for(tmp_path, alpaca_rows(40)), tokenizer, 2048)
    streamed = prepare(config_for(tmp_path, alpaca_rows(40), streaming=True, max_steps=30, micro_batch_size=4), tokenizer, 2048)
    assert isinstance(streamed.train, Stream) and len(streamed.train) == 30 * 4 * 1
    assert ids(streamed.train[:40]) == ids(cached.train)
    assert ids(streamed.train[40:45]) == ids(cached.train[:5])  # the stream repeats
    assert ids([streamed.train[3]]) == ids([cached.train[3]])  # asked for an earlier example: read again
    assert streamed.folder is None  # nothing written: a stream has no cache


def test_the_head_validates_and_training_starts_after_it(tmp_path, tokenizer):
    rows = alpaca_rows(30)
    data = prepare(config_for(tmp_path, rows, streaming=True, max_val_samples=6, max_steps=4, micro_batch_size=6), tokenizer, 2048)
    whole = prepare(config_for(tmp_path, rows), tokenizer, 2048)
    assert ids(data.val) == ids(whole.train[:6])
    assert ids(data.train[:24]) == ids(whole.train[6:])
    assert data.summary.streamed and any("6 validation rows from the head" in line for line in data.summary.lines())


def test_pt_documents_join_one_stream_cut_into_rows(tmp_path, tokenizer):
    rows = [{"text": f"document {i} " + "word " * (i % 9)} for i in range(50)]
    settings = dict(stage="pt", template=None, max_input_length=16)
    cached = prepare(config_for(tmp_path, rows, **settings), tokenizer, 2048)
    streamed = prepare(config_for(tmp_path, rows, streaming=True, max_steps=50, **settings), tokenizer, 2048)
    assert ids(streamed.train[: len(cached.train) - 1]) == ids(cached.train[:-1])  # the last cached row is the remainder


def test_weights_interleave_the_datasets_row_by_row(tmp_path, tokenizer):
    a = write_rows(tmp_path / "a.jsonl", [{"instruction": f"A{i}", "output": "a"} for i in range(10)])
    b = write_rows(tmp_path / "b.jsonl", [{"instruction": "B", "output": "b"} for _ in range(10)])
    data = prepare(config_for(tmp_path, dataset=[str(a), str(b)], dataset_weights=[3, 1], streaming=True, max_steps=400),
                   tokenizer, 2048)
    texts = [tokenizer.decode(e["input_ids"]) for e in data.train[:400]]
    from_b = sum("user\nB<" in t for t in texts)
    assert 70 < from_b < 130  # a quarter of 400, drawn
    from_a = [t.split("user\n")[1].split("<")[0] for t in texts if "user\nA" in t]
    assert from_a[:12] == [f"A{i}" for i in range(10)] + ["A0", "A1"]  # each dataset in its order, again when it ends


def test_streaming_is_checked_before_it_runs(tmp_path, capsys):
    config = make_config(tmp_path, streaming=True, max_steps=-1, validation_split_ratio=0.1, pack_to_length=True)
    assert main(["check", str(config)]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert any(line.startswith("error: streaming: a stream's length is not known") and "set max_steps" in line for line in errors)
    assert any(line.startswith("error: validation_split_ratio:") and "max_val_samples" in line for line in errors)
    assert any(line.startswith("error: pack_to_length:") for line in errors), errors


def test_a_streamed_run_trains_and_resumes_at_the_same_example(tmp_path):
    settings = dict(method="full", learning_rate=2e-3, streaming=True, max_steps=10, save_steps=4, save_total_limit=None,
                    micro_batch_size=3, gradient_accumulation_steps=2, lr_scheduler="cosine", max_val_samples=4,
                    eval_steps=5)
    straight = run(make_config(tmp_path, name="straight", **settings))
    curve = losses(straight)
    assert len(curve) == 10 and sum(curve[-3:]) / 3 < curve[0]
    # the same run stopped after its checkpoint at step 8, then resumed: the stream finds example 8 * 6 again
    stopped = tmp_path / "stopped"
    shutil.copytree(straight.run_dir, stopped)
    shutil.rmtree(stopped / "final")
    for later in (stopped / "checkpoints").iterdir():
        if int(later.name.split("-")[1]) > 8:
            shutil.rmtree(later)
    metrics = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    (stopped / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics if m.get("step", 0) <= 8))
    config = make_config(tmp_path, name="stopped", **settings)
    resumed = run(config, resume="latest")
    a, b = load_file(straight.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert losses(resumed) == curve


def test_streaming_with_a_stage_that_reads_its_rows_whole_is_refused(tmp_path, capsys):
    config = make_config(tmp_path, stage="kto", streaming=True)
    assert main(["check", str(config)]) == 1
    assert "error: streaming: stage kto reads its rows whole" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["dpo"])
def test_pairs_stream_too(tmp_path, tokenizer, stage):
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    cached = prepare(config_for(tmp_path, rows, stage=stage), tokenizer, 2048)
    streamed = prepare(config_for(tmp_path, rows, stage=stage, streaming=True, max_steps=12), tokenizer, 2048)
    assert [list(map(int, e["chosen_input_ids"])) for e in streamed.train[:12]] == \
        [list(map(int, e["chosen_input_ids"])) for e in cached.train]
