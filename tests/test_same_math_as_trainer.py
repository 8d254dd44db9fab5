"""lmtune computes what transformers `Trainer` (+ `peft`) computes: same start, same examples, same losses.

Both start from the same weights (for LoRA, the same initial adapter), see the
same tokenised examples in the same order and use the same optimizer,
schedule, clipping and accumulation. lmtune packs its batches (the default)
and runs its own loss; Trainer pads and runs the model's loss. Ten steps of
per-step losses must agree within float tolerance, and so must the weights.
"""

import json

import pytest
import torch

from lmtune.config.load import resolve
from lmtune.data.batches import Batches
from lmtune.data.pipeline import prepare
from lmtune.engine import loop
from lmtune.engine.report import read_metrics
from lmtune.model.load import load_tokenizer

STEPS, MICRO, ACCUM = 10, 2, 2


def lmtune_config(tmp_path, method):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Repeat {'word ' * (1 + i % 7)}please.", "output": f"{'ok ' * (1 + (i * 5) % 9)}done {i}"} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "base_model": "builtin:tiny", "dataset": str(data), "template": "chatml", "method": method,
        "micro_batch_size": MICRO, "gradient_accumulation_steps": ACCUM, "max_steps": STEPS,
        "learning_rate": 1e-3 if method == "lora" else 3e-4, "lr_scheduler": "linear",
        "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 1, "seed": 5,
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "plot_loss": False,
    }
    if method == "lora":
        settings.update(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target=["q_proj", "k_proj", "v_proj", "o_proj"])
    resolved = resolve(data=settings)
    assert not resolved.errors, resolved.errors
    return resolved.config


def trainer_losses(config, start_state, order, examples, method):
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from datasets import Dataset

    from lmtune.model.load import model_location

    location = model_location(config.model.base_model)
    model = AutoModelForCausalLM.from_pretrained(location, torch_dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    model.load_state_dict(start_state, strict=False)
    tokenizer = load_tokenizer(config)
    rows = [examples[i] for i in order[: STEPS * MICRO * ACCUM]]
    dataset = Dataset.from_list([{"input_ids": list(r["input_ids"]), "labels": list(r["labels"]), "attention_mask": [1] * len(r["input_ids"])} for r in rows])
    micro_losses = []

    class Recording(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)  # lmtune's order, as given

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            micro_losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    arguments = TrainingArguments(
        output_dir=str(config.output.output_dir) + "-trainer", per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=config.training.learning_rate,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        adam_beta1=config.training.adam_beta1, adam_beta2=config.training.adam_beta2, adam_epsilon=config.training.adam_epsilon,
        logging_steps=1, save_strategy="no", report_to=[], seed=5, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Recording(model=model, args=arguments, train_dataset=dataset, data_collator=collator)
    trainer.train()
    # The model's loss is each micro batch's summed loss over the accumulated batch's tokens: a step's loss is their sum.
    steps = [sum(micro_losses[i : i + ACCUM]) for i in range(0, len(micro_losses), ACCUM)]
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return steps, trained


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ten_steps_match_transformers_trainer(tmp_path, method, monkeypatch):
    config = lmtune_config(tmp_path, method)
    captured = {}
    apply = loop.apply_method

    def recording_apply(model, config):
        model = apply(model, config)
        captured["start"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        captured["model"] = model
        return model

    monkeypatch.setattr(loop, "apply_method", recording_apply)
    result = loop.train(config, quiet=True)
    ours = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(ours) == STEPS

    tokenizer = load_tokenizer(config)
    examples = prepare(config, tokenizer, 2048).train
    order = Batches(examples, MICRO, tokenizer.pad_token_id, shuffle=True, seed=config.training.seed)._order(0)
    theirs, their_weights = trainer_losses(config, captured["start"], order, examples, method)

    assert len(theirs) == STEPS
    assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), rtol=2e-4, atol=1e-5), (ours, theirs)
    assert ours[-1] < ours[0]  # and both learn
    our_weights = {n: p.detach() for n, p in captured["model"].named_parameters() if p.requires_grad}
    assert their_weights.keys() == our_weights.keys()
    for name, weight in our_weights.items():
        assert torch.allclose(weight, their_weights[name], rtol=1e-3, atol=1e-5), name
