"""`lmtune data`: what the data step makes of the user's files, shown before any training."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config.schema import Config
from .batches import IGNORE, Batches, batch_layout
from .pipeline import prepare

GREEN, RESET = "\033[32m", "\033[0m"
STREAM_HEAD = 1000  # examples of a stream measured by `lmtune data`


def percentiles(lengths: Any) -> str:
    if not len(lengths):
        return "none"
    marks = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
    return f"median {marks[0]}, p90 {marks[1]}, p99 {marks[2]}, max {marks[3]}"


def highlight(tokenizer: Any, ids: Any, labels: Any, color: bool) -> str:
    """The example as text; trained tokens green on a terminal, else inside [[ ]]."""
    out, run, trained = [], [], None
    for token, label in zip(list(ids), list(labels)):
        is_trained = label != IGNORE
        if trained is not None and is_trained != trained:
            out.append((tokenizer.decode(run), trained))
            run = []
        run.append(int(token))
        trained = is_trained
    if run:
        out.append((tokenizer.decode(run), trained))
    if color:
        return "".join(f"{GREEN}{text}{RESET}" if t else text for text, t in out)
    return "".join(f"[[{text}]]" if t else text for text, t in out)


def show_data(config: Config, config_dir: Optional[Path], show: int) -> None:
    from ..model.load import context_length, load_model_config, load_tokenizer

    tokenizer = load_tokenizer(config)
    model_config = load_model_config(config)
    data = prepare(config, tokenizer, context_length(model_config), config_dir)
    for line in data.summary.lines():
        print(line)
    field = "input_ids" if data.train and "input_ids" in data.train[0] else "chosen_input_ids"
    streamed = getattr(data.train, "streamed", False)
    head = data.train[:STREAM_HEAD] if streamed else data.train  # a stream is not read whole to be shown
    lengths = (data.train.field_lengths(field) if hasattr(data.train, "field_lengths")
               else [len(e[field]) for e in head])
    print(f"tokens per example{f' (the first {len(head)} of the stream)' if streamed else ''}: {percentiles(lengths)}")
    if field == "input_ids" and not streamed:
        size = config.training.micro_batch_size
        seed = config.training.seed
        padded = Batches(data.train, size, tokenizer.pad_token_id, seed=seed).padding_fraction()
        grouped = Batches(data.train, size, tokenizer.pad_token_id, seed=seed, group_by_length=True).padding_fraction()
        if config.data.pack_to_length:
            rows = Batches(data.train, size, tokenizer.pad_token_id, seed=seed, packing=True, pack_length=data.summary.max_len)
            print(f"training batches: {size} row(s) each, {batch_layout(rows, config.training.gradient_accumulation_steps)}")
        else:
            layout = (
                "training pads each batch (packing: false)" if config.data.packing is False
                else "training packs each batch without padding (the default; packing: false pads)"
            )
            print(f"padding if batches of {size} were padded: {padded:.1%} of positions, {grouped:.1%} grouped by length; {layout}")
    color = sys.stdout.isatty()
    for number, example in enumerate(data.train[:show], 1):
        print(f"\n--- example {number} ({'trained tokens in green' if color else 'trained tokens in [[ ]]'})")
        if "label" in example:  # kto: one answer, desirable or not
            print(f"label: {'desirable' if example['label'][0] else 'undesirable'}")
        if "labels" in example:
            print(highlight(tokenizer, example["input_ids"], example["labels"], color))
        elif "chosen_input_ids" in example:
            print("chosen:   " + highlight(tokenizer, example["chosen_input_ids"], example["chosen_labels"], color))
            print("rejected: " + highlight(tokenizer, example["rejected_input_ids"], example["rejected_labels"], color))
        else:
            print(tokenizer.decode(list(example["input_ids"])))
