"""The tokenised cache at scale: columns mapped from disk (never loaded whole), written a chunk at a time,
rebuilt when damaged, and a full disk said in one line; `check` does not read the same rows twice."""

import errno
import json

import numpy as np
import pytest

from lmtune.data import cache, pipeline
from lmtune.data.batches import Batches
from lmtune.data.pipeline import check_local_records, prepare
from lmtune.data.records import DataError

from test_data_pipeline import alpaca_rows, config_for


def test_examples_are_mapped_views_of_the_cache_files(tmp_path, tokenizer):
    data = prepare(config_for(tmp_path, alpaca_rows(300)), tokenizer, 2048)
    example = data.train[7]
    assert isinstance(example["input_ids"].base, np.memmap) or isinstance(example["input_ids"], np.memmap)
    lengths = data.train.field_lengths("input_ids")
    assert lengths.tolist() == [len(e["input_ids"]) for e in data.train]
    assert Batches(data.train, 4, 0, pack_length=64).rows == Batches(list(data.train), 4, 0, pack_length=64).rows
    assert [list(e["labels"]) for e in data.train[:3]] == [list(data.train[i]["labels"]) for i in range(3)]


def test_written_a_chunk_at_a_time_equals_what_a_list_would_hold(tmp_path):
    examples = [{"input_ids": list(range(i % 7 + 1)), "labels": [-100] * (i % 7 + 1), "margin": [0.5 * i]} for i in range(50)]
    writer = cache.Writer(tmp_path, "train")
    for start in range(0, 50, 8):
        writer.add(examples[start : start + 8])
    fields = writer.close()
    cache.seal(tmp_path, {"train": fields, "val": []}, {"n": 50})
    train, val, summary = cache.load(tmp_path)
    assert len(train) == 50 and len(val) == 0 and summary == {"n": 50}
    for ours, theirs in zip(train, examples):
        assert {k: v.tolist() for k, v in ours.items()} == theirs


@pytest.mark.parametrize("harm", ["truncate", "flip", "remove"])
def test_a_damaged_cache_is_rebuilt_with_a_note(harm, tmp_path, tokenizer, capsys):
    config = config_for(tmp_path, alpaca_rows(60))
    first = prepare(config, tokenizer, 2048)
    expected = [e["input_ids"].tolist() for e in first.train]
    target = first.folder / "train.input_ids.bin"
    del first  # its mapping of the file harmed below
    raw = target.read_bytes()
    if harm == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif harm == "flip":
        target.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    else:
        target.unlink()
    capsys.readouterr()
    again = prepare(config, tokenizer, 2048)
    out = capsys.readouterr().out
    assert "is damaged" in out and "train.input_ids.bin" in out and "tokenising again" in out
    assert not again.summary.from_cache
    assert [e["input_ids"].tolist() for e in again.train] == expected
    assert prepare(config, tokenizer, 2048).summary.from_cache


def test_a_full_disk_while_caching_is_one_line_with_the_space_left(tmp_path, tokenizer, monkeypatch):
    def full(self, examples):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.Writer, "add", full)
    with pytest.raises(DataError) as error:
        prepare(config_for(tmp_path), tokenizer, 2048)
    message = str(error.value)
    assert "\n" not in message and "the disk is full" in message and "MiB free" in message and "cache_dir" in message
    assert not any((tmp_path / "cache" / "data").glob("*/summary.json"))  # nothing half-written left as a cache


def test_check_does_not_read_rows_a_run_has_tokenised(tmp_path, tokenizer, monkeypatch):
    config = config_for(tmp_path, alpaca_rows(30))
    first = check_local_records(config)
    assert not (tmp_path / "cache" / "records").exists()  # check itself writes nothing
    prepare(config, tokenizer, 2048)

    def no_reading(*args, **kwargs):
        raise AssertionError("rows read again")

    monkeypatch.setattr(pipeline, "load_records", no_reading)
    assert check_local_records(config) == first
    monkeypatch.undo()
    changed = config_for(tmp_path, alpaca_rows(31))
    assert check_local_records(changed).rows_read == 31


def test_the_summary_reports_the_cache_size_on_disk(tmp_path, tokenizer):
    data = prepare(config_for(tmp_path, alpaca_rows(40)), tokenizer, 2048)
    assert data.summary.cache_mib == pytest.approx(cache.disk_bytes(data.folder) / 2**20)
    assert any("MiB on disk, memory-mapped" in line for line in data.summary.lines())
    assert any("0.0 MiB of it in memory" in line for line in data.summary.lines())  # 40 examples: 320 bytes
    json.dumps(data.summary.lines())


def test_a_bad_row_deep_in_a_file_read_by_workers_is_named_by_line(tmp_path, tokenizer):
    rows = alpaca_rows(3000)
    rows[2456] = {"instruction": "q", "output": ""}
    with pytest.raises(DataError, match=r"train\.jsonl line 2457: the field `output` is missing or empty"):
        prepare(config_for(tmp_path, rows, preprocessing_num_workers=2), tokenizer, 2048)


def test_line_ends_marks_and_blank_lines_are_read_as_the_line_reader_reads_them(tmp_path, tokenizer):
    rows = alpaca_rows(5)
    body = "\r\n".join(json.dumps(r) for r in rows[:3]) + "\r\n\r\n   \n" + "\n".join(json.dumps(r) for r in rows[3:])
    (tmp_path / "odd.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # JSON lines named .json
    plain = prepare(config_for(tmp_path, rows), tokenizer, 2048)
    for name in ("odd.jsonl", "lines.json"):
        data = prepare(config_for(tmp_path, rows, dataset=str(tmp_path / name)), tokenizer, 2048)
        assert data.summary.rows_read == 5 and [e["input_ids"].tolist() for e in data.train] == \
            [e["input_ids"].tolist() for e in plain.train], name


def test_a_field_that_first_appears_in_a_later_chunk_is_empty_in_the_earlier_examples(tmp_path):
    writer = cache.Writer(tmp_path, "train")
    writer.add([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    writer.add([{"input_ids": [4], "columns": [7, 8]}, {"input_ids": [5, 6]}])
    fields = writer.close()
    cache.seal(tmp_path, {"train": fields, "val": []}, {})
    train, _, _ = cache.load(tmp_path)
    assert [e["input_ids"].tolist() for e in train] == [[1, 2], [3], [4], [5, 6]]
    assert [e["columns"].tolist() for e in train] == [[], [], [7, 8], []]


def test_the_main_process_holds_an_index_not_the_rows(tmp_path, tokenizer):
    from lmtune.data.pipeline import plan_rows
    from lmtune.data.sources import JsonLines

    config = config_for(tmp_path, alpaca_rows(500))
    rows = plan_rows(config)
    [source] = rows.sources
    assert isinstance(source, JsonLines) and len(source) == 500
    assert source.starts.nbytes + source.ends.nbytes + source.lines.nbytes == 500 * 20
    assert len(rows.train) == 500 and rows.train.position.dtype == np.int64


def test_the_line_index_is_the_same_whatever_the_block_it_reads(tmp_path, monkeypatch):
    from lmtune.data import sources

    rows = alpaca_rows(40)
    text = "\r\n".join(json.dumps(r) for r in rows[:20]) + "\n\n  \n" + "\n".join(json.dumps(r) for r in rows[20:])
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    whole = sources.JsonLines(path)
    monkeypatch.setattr(sources, "BLOCK", 7)  # lines far longer than a block: each read on into the next
    small = sources.JsonLines(path)
    for field in ("starts", "ends", "lines"):
        assert getattr(small, field).tolist() == getattr(whole, field).tolist()
    read = [row.values for row in sources.rows_of(small.payload(np.arange(40)))]
    assert read == rows and whole.lines.tolist()[20] == 23  # line numbers count the blank lines


def _listed_order(lengths, micro, seed, epoch, group):
    """The epoch order as lists computed it before it was an int64 array (the reference for exactness)."""
    import random

    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    if group:
        size = micro * 50
        chunks = [sorted(order[i : i + size], key=lambda j: -lengths[j]) for i in range(0, len(order), size)]
        groups = [c[i : i + micro] for c in chunks for i in range(0, len(c), micro)]
        rng.shuffle(groups)
        order = [i for g in groups for i in g]
    return order


@pytest.mark.parametrize("micro", [1, 3, 4])
@pytest.mark.parametrize("group", [False, True])
def test_the_epoch_order_as_an_array_is_the_order_lists_gave(micro, group):
    rng = np.random.default_rng(micro)
    for count in (1, 7, 149, 1003):
        lengths = rng.integers(1, 12, size=count).tolist()  # few distinct lengths: many ties, which must keep their order
        examples = [{"input_ids": [0] * n, "labels": [0] * n} for n in lengths]
        for epoch in (0, 2):
            ours = Batches(examples, micro, 0, seed=5, group_by_length=group)._order(epoch)
            assert ours.tolist() == _listed_order(lengths, micro, 5, epoch, group), (count, epoch)


def _labels_from_offsets(backend, examples):
    """Labels as the tokenizer's offsets give them (the path for every tokenizer): the reference."""
    from lmtune.data import tokenize

    texts = ["".join(text for text, _ in segments) for segments in examples]
    out = []
    for encoding, segments in zip(backend.encode_batch(texts, add_special_tokens=False), examples):
        labels = tokenize._labels_by_characters(encoding, encoding.ids, segments)
        out.append((encoding.ids, labels if labels is not None else tokenize._labels_by_offsets(encoding.ids, encoding.offsets, segments)))
    return out


def _random_examples(seed, count=300):
    rng = np.random.default_rng(seed)
    pieces = ["hello", " world", "  ", "\n", "é", "naïve", "日本語", "🙂", "<|im_start|>", "<|im_end|>", "x", "42", " 7", "\t", ""]
    examples = []
    for _ in range(count):
        segments = []
        for part in range(int(rng.integers(1, 6))):
            text = "".join(rng.choice(pieces, size=int(rng.integers(0, 6))).tolist())
            segments.append((text, bool(part % 2)))
        examples.append(segments)
    return examples


def test_labels_from_byte_lengths_are_the_labels_offsets_give(tokenizer):
    from lmtune.data import tokenize

    backend = tokenizer.backend_tokenizer
    assert tokenize.byte_lengths(backend) is not None  # the builtin tokenizer is byte-level: the fast path is taken
    for seed in range(4):
        examples = _random_examples(seed)
        assert tokenize.encode_examples(tokenizer, examples) == _labels_from_offsets(backend, examples), seed


def test_a_tokenizer_whose_tokens_are_not_byte_spans_is_labelled_from_offsets(tokenizer):
    """Trimmed offsets or a normaliser: no byte table. An added token that swallows the spaces beside it: the
    chunk falls back to offsets. Either way the labels are the offsets' labels."""
    from tokenizers import AddedToken, Tokenizer, normalizers, processors

    from lmtune.data import tokenize

    trimmed = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    trimmed.post_processor = processors.ByteLevel(trim_offsets=True)
    lowered = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    lowered.normalizer = normalizers.Lowercase()
    assert tokenize.byte_lengths(trimmed) is None and tokenize.byte_lengths(lowered) is None
    stripping = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    stripping.add_special_tokens([AddedToken("<sep>", lstrip=True, rstrip=True)])
    assert tokenize.byte_lengths(stripping) is not None
    composing = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    composing.normalizer = normalizers.NFC()  # Qwen's: exact for text already in NFC, which "e\u0301" is not
    assert tokenize.byte_lengths(composing) is not None
    examples = [[("a <sep> b", False), (" answer", True)], [("cafe\u0301 ", False), ("ok", True)],
                [("x a\u0301", False), ("\u0323 y", True)], *_random_examples(9, 50), [("end <sep> ", False), (" x", True)]]
    for backend in (trimmed, lowered, stripping, composing):
        encoder = type("Fast", (), {"is_fast": True, "backend_tokenizer": backend, "bos_token_id": None})()
        assert tokenize.encode_examples(encoder, examples) == _labels_from_offsets(backend, examples)
