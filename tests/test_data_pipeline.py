"""The data step: sources, bad data, split, caps, cache, truncation, packing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import COMPAT, FIXTURES
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data import pipeline
from lmtune.data.batches import Batches, packed_batch, pad_batch
from lmtune.data.pipeline import prepare, split_rows

BAD_DATA = sorted(p for p in (FIXTURES / "bad_data").iterdir() if p.is_dir())


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n, width=3):
    return [{"instruction": f"Echo {i}", "input": " ".join(["w"] * (i % width + 1)), "output": f"answer {i}"} for i in range(n)]


def config_for(tmp_path, rows=None, **settings):
    data = write_rows(tmp_path / "train.jsonl", rows if rows is not None else alpaca_rows(40))
    values = {"base_model": "builtin:tiny", "dataset": str(data), "template": "chatml", "cache_dir": str(tmp_path / "cache")}
    values.update(settings)
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return load_config(path)


def test_at_least_15_bad_data_fixtures():
    assert len(BAD_DATA) >= 15


@pytest.mark.parametrize("folder", BAD_DATA, ids=[p.name for p in BAD_DATA])
def test_bad_data_gives_one_line_error(folder, capsys, tiny_dir, monkeypatch):
    config = folder / "config.yaml"
    expected = config.read_text().splitlines()[0].removeprefix("# expect: ")
    monkeypatch.chdir(folder)
    code = main(["data", str(config), "--set", f"cache_dir={folder.parent.parent.parent / '.cache-unused'}", "--set", "overwrite_cache=true"])
    out = capsys.readouterr()
    assert code == 1, out.out
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.err, out.err
    assert expected in errors[0], errors[0]


def test_every_row_is_accounted_for(tmp_path, tokenizer):
    rows = [{"instruction": "x " * 300, "output": "long"}] * 3 + alpaca_rows(30)
    config = config_for(tmp_path, rows, max_input_length=64, truncation="drop", validation_split_ratio=0.1, max_train_samples=20)
    data = prepare(config, tokenizer, 2048)
    s = data.summary
    assert s.rows_read == 33
    assert s.train_rows + s.val_rows == 33
    assert s.capped == {"train": s.train_rows - 20}
    dropped = s.outcomes.get("dropped: longer than max_input_length", 0)
    assert dropped >= 1
    assert dropped + s.outcomes["kept"] == 20 + s.val_rows
    assert len(data.train) + len(data.val) == s.outcomes["kept"]


def trained_text(tokenizer, example):
    return tokenizer.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != -100])


def test_keep_response_cuts_the_prompt_from_the_left(tmp_path, tokenizer):
    rows = [{"instruction": "many words " * 40, "output": "the answer"}]
    config = config_for(tmp_path, rows, max_input_length=32, truncation="keep_response")
    data = prepare(config, tokenizer, 2048)
    [example] = data.train
    assert len(example["input_ids"]) == 32
    assert trained_text(tokenizer, example) == "the answer<|im_end|>\n"
    assert data.summary.outcomes == {"truncated": 1}


def test_truncate_end_keeps_the_prompt_and_the_answers_start(tmp_path, tokenizer):
    rows = [{"instruction": "Say it.", "output": "yes " * 40}]
    data = prepare(config_for(tmp_path, rows, max_input_length=24, truncation="truncate_end"), tokenizer, 2048)
    [example] = data.train
    assert len(example["input_ids"]) == 24
    assert tokenizer.decode(list(example["input_ids"])).startswith("<|im_start|>user\nSay it.")
    assert trained_text(tokenizer, example).startswith("yes yes")


def test_truncate_end_drops_an_example_whose_answer_is_cut_away(tmp_path, tokenizer):
    rows = [{"instruction": "many words " * 40, "output": "the answer"}] + alpaca_rows(2)
    data = prepare(config_for(tmp_path, rows, max_input_length=32, truncation="truncate_end"), tokenizer, 2048)
    assert data.summary.outcomes == {"dropped: no answer token fits in max_input_length": 1, "kept": 2}
    assert len(data.train) == 2


def test_split_is_seeded_and_whole_examples():
    assert split_rows(100, 0.2, 7) == split_rows(100, 0.2, 7)
    assert split_rows(100, 0.2, 7) != split_rows(100, 0.2, 8)
    train, val = split_rows(100, 0.2, 7)
    assert len(val) == 20 and not set(train) & set(val) and sorted(train + val) == list(range(100))


def test_split_is_the_same_in_another_process():
    code = "from lmtune.data.pipeline import split_rows; print(split_rows(50, 0.3, 11))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == str(split_rows(50, 0.3, 11))


def test_split_does_not_depend_on_the_training_seed(tmp_path, tokenizer):
    a = prepare(config_for(tmp_path, validation_split_ratio=0.25, seed=1), tokenizer, 2048)
    b = prepare(config_for(tmp_path, validation_split_ratio=0.25, seed=2, overwrite_cache=True), tokenizer, 2048)
    assert [list(e["input_ids"]) for e in a.val] == [list(e["input_ids"]) for e in b.val]
    c = prepare(config_for(tmp_path, validation_split_ratio=0.25, train_data_split_seed=5), tokenizer, 2048)
    assert [list(e["input_ids"]) for e in a.val] != [list(e["input_ids"]) for e in c.val]


def test_cache_is_reused_rebuilt_on_request_and_never_stale(tmp_path, tokenizer, monkeypatch):
    config = config_for(tmp_path)
    first = prepare(config, tokenizer, 2048)
    assert not first.summary.from_cache

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(pipeline, "tokenize_all", no_tokenising)
    second = prepare(config, tokenizer, 2048)
    assert second.summary.from_cache
    assert [list(e["input_ids"]) for e in second.train] == [list(e["input_ids"]) for e in first.train]
    monkeypatch.undo()

    rebuilt = prepare(config_for(tmp_path, overwrite_cache=True), tokenizer, 2048)
    assert not rebuilt.summary.from_cache
    changed_file = prepare(config_for(tmp_path, alpaca_rows(41)), tokenizer, 2048)
    assert not changed_file.summary.from_cache and len(changed_file.train) == 41
    changed_setting = prepare(config_for(tmp_path, alpaca_rows(41), train_on_inputs=True), tokenizer, 2048)
    assert not changed_setting.summary.from_cache


def test_workers_give_the_same_examples(tmp_path, tokenizer):
    one = prepare(config_for(tmp_path, alpaca_rows(300)), tokenizer, 2048)
    two = prepare(config_for(tmp_path, alpaca_rows(300), preprocessing_num_workers=2, overwrite_cache=True), tokenizer, 2048)
    assert [list(e["labels"]) for e in one.train] == [list(e["labels"]) for e in two.train]


def test_sources_jsonl_json_csv_txt_parquet_folder_and_save_to_disk(tmp_path, tokenizer):
    import datasets

    rows = alpaca_rows(6)
    folder = tmp_path / "many"
    folder.mkdir()
    write_rows(folder / "a.jsonl", rows[:2])
    (folder / "b.json").write_text(json.dumps(rows[2:4]))
    (folder / "c.csv").write_text("instruction,input,output\n" + "".join(f"{r['instruction']},{r['input']},{r['output']}\n" for r in rows[4:]))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for source, count in ((folder, 6), (tmp_path / "d.parquet", 6), (tmp_path / "saved", 6)):
        config = config_for(tmp_path, dataset=str(source), overwrite_cache=True)
        assert len(prepare(config, tokenizer, 2048).train) == count, source
    (tmp_path / "doc.txt").write_text("first paragraph\n\nsecond paragraph\n")
    pt = config_for(tmp_path, dataset=str(tmp_path / "doc.txt"), stage="pt", template=None)
    [example] = prepare(pt, tokenizer, 2048).train
    assert tokenizer.decode(list(example["input_ids"])) == "first paragraph<|end_of_text|>second paragraph<|end_of_text|>"


def test_pt_chunks_documents_to_max_length(tmp_path, tokenizer):
    rows = [{"text": "word " * 50} for _ in range(4)]
    data = prepare(config_for(tmp_path, rows, stage="pt", template=None, max_input_length=64), tokenizer, 2048)
    assert all(len(e["input_ids"]) <= 64 for e in data.train)
    assert sum(len(e["input_ids"]) for e in data.train) == 4 * (len(tokenizer("word " * 50, add_special_tokens=False)["input_ids"]) + 1)


def test_mixing_weights(tmp_path, tokenizer):
    a = write_rows(tmp_path / "a.jsonl", alpaca_rows(10))
    b = write_rows(tmp_path / "b.jsonl", [{"instruction": "B", "output": "b"}] * 10)
    data = prepare(config_for(tmp_path, dataset=[str(a), str(b)], dataset_weights=[3, 1]), tokenizer, 2048)
    from_b = sum(1 for e in data.train if tokenizer.decode(list(e["input_ids"])).count("user\nB<") == 1)
    assert len(data.train) == 20 and from_b == 5


def test_jumpstart_instruction_data_with_template_json(tmp_path, tokenizer):
    folder = tmp_path / "train"
    folder.mkdir()
    for name in ("train.jsonl", "template.json"):
        (folder / name).write_text((COMPAT / "sagemaker" / name).read_text())
    config = config_for(tmp_path, dataset=str(folder), instruction_tuned=True, template=None)
    data = prepare(config, tokenizer, 2048)
    first = data.train[0]
    text = tokenizer.decode(list(first["input_ids"]))
    assert text.startswith("<|begin_of_text|>Below is an instruction that describes a task")
    trained = tokenizer.decode([i for i, l in zip(first["input_ids"], first["labels"]) if l != -100])
    assert trained == " Heavy rain flooded the low fields while the hilltop village stayed dry.<|end_of_text|>"


def test_jumpstart_chat_dialogs(tmp_path, tokenizer):
    config = config_for(tmp_path, dataset=str(COMPAT / "sagemaker" / "chat.jsonl"), chat_dataset=True, template=None)
    data = prepare(config, tokenizer, 2048)
    assert data.summary.formats == {"chat": sum(1 for _ in open(COMPAT / "sagemaker" / "chat.jsonl"))}
    trained = tokenizer.decode([i for i, l in zip(data.train[0]["input_ids"], data.train[0]["labels"]) if l != -100])
    assert "A whole number above 1" in trained and "No, 9 is divisible by 3." in trained and "prime" not in trained


def test_llamafactory_sharegpt_preference_rows(tmp_path, tokenizer):
    config = config_for(tmp_path, dataset=str(COMPAT / "llamafactory" / "dpo_en_demo.json"), stage="dpo", template=None)
    data = prepare(config, tokenizer, 2048)
    pair = data.train[0]
    assert set(pair) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    n_prompt = sum(1 for l in pair["chosen_labels"] if l == -100)
    assert list(pair["chosen_input_ids"][:n_prompt]) == list(pair["rejected_input_ids"][:n_prompt])


def test_packed_batch_loss_equals_unpacked(tiny_dir):
    from transformers import AutoModelForCausalLM

    from lmtune.losses import summed_token_loss
    from lmtune.model.packed_attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    generator = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 5, 9, 16, 3):
        ids = torch.randint(5, 1000, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    with torch.no_grad():
        alone = sum(summed_token_loss(model, pad_batch([e], 0)) for e in examples)
        use_packed_attention(model)
        packed_row = packed_batch(examples)
        assert packed_row["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
        packed = summed_token_loss(model, packed_row)
        padded = summed_token_loss(model, pad_batch(examples, 0))  # eval batches after the switch
        leaky = dict(packed_row, cu_seq_lens=torch.tensor([0, packed_row["input_ids"].shape[1]]))
        one_sequence = summed_token_loss(model, leaky)
    assert torch.allclose(packed, alone, atol=1e-4)
    assert torch.allclose(padded, alone, atol=1e-4)
    assert not torch.allclose(one_sequence, alone, atol=1e-2)  # the boundaries are what keeps examples apart


def test_packing_and_length_grouping_cut_padding():
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in [30, 1000, 45, 700, 120, 600, 33, 950] * 10]
    plain = Batches(examples, 4, 0, seed=1).padding_fraction()
    grouped = Batches(examples, 4, 0, seed=1, group_by_length=True).padding_fraction()
    packed = Batches(examples, 4, 0, seed=1, packing=True)
    assert plain > 0.4 and grouped < plain / 4 and packed.padding_fraction() == 0.0
    padded = Batches(examples, 4, 0, seed=1)
    for row, block in zip(packed.epoch(0), padded.epoch(0)):  # the same examples, laid out without padding
        assert row["input_ids"].shape == (1, int(block["attention_mask"].sum()))
