"""`lmtune train` for real on the tiny offline model: methods, precisions, outputs, determinism, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.config import load_config
from lmtune.engine.loop import TrainingError, train
from lmtune.engine.report import read_metrics


def sft_rows(n=32):
    return [{"instruction": f"What is item {i % 8}?", "output": f"It is number {i % 8}."} for i in range(n)]


def text_rows(n=24):
    return [{"text": f"The number {i % 6} follows {(i + 5) % 6} and comes before {(i + 1) % 6}."} for i in range(n)]


def make_config(tmp_path: Path, rows=None, name="run", **settings) -> Path:
    data = tmp_path / "data.jsonl"
    if not data.exists() or rows is not None:
        data.write_text("".join(json.dumps(r) + "\n" for r in (rows or sft_rows())))
    values = {
        "base_model": "builtin:tiny",
        "dataset": str(data),
        "template": "chatml",
        "micro_batch_size": 4,
        "max_steps": 12,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "lr_scheduler": "constant",
        "output_dir": str(tmp_path / name),
        "cache_dir": str(tmp_path / "cache"),
        "plot_loss": False,
        "seed": 3,
    }
    values.update(settings)
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


def run(path: Path, **kwargs):
    return train(load_config(path), path.parent, quiet=True, **kwargs)


def losses(result) -> list[float]:
    return [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]


METHODS = {
    "full": {"method": "full", "learning_rate": 2e-3},
    "freeze": {"method": "freeze", "freeze_trainable_layers": 1, "learning_rate": 5e-3},
    "lora": {"method": "lora", "lora_r": 8, "learning_rate": 1e-2},
    "qlora": {"method": "qlora", "lora_r": 8, "learning_rate": 1e-2},
    "int8_lora": {"method": "lora", "int8_quantization": True, "lora_r": 8, "learning_rate": 1e-2},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_loss_falls(tmp_path, method, precision):
    result = run(make_config(tmp_path, precision=precision, **METHODS[method]))
    curve = losses(result)
    assert len(curve) == 12 and all(map(torch.isfinite, torch.tensor(curve)))
    assert sum(curve[-3:]) / 3 < 0.9 * curve[0], curve
    assert (result.final_dir / "lmtune.json").exists()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_pt_loss_falls(tmp_path, method):
    settings = {**METHODS[method], "stage": "pt", "template": None, "max_input_length": 64}
    result = run(make_config(tmp_path, rows=text_rows(), **settings))
    curve = losses(result)
    assert sum(curve[-3:]) / 3 < 0.9 * curve[0], curve


def test_freeze_leaves_frozen_weights_bit_identical(tmp_path, tiny_dir):
    result = run(make_config(tmp_path, method="freeze", freeze_trainable_layers=1, freeze_trainable_modules=["mlp"]))
    before = load_file(tiny_dir / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.mlp.") for name in changed), changed
    assert len(changed) == 3  # gate, up and down projections of the last layer


def test_lora_output_loads_in_plain_peft_with_the_logits_chat_uses(tmp_path, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmtune.generate import load_for_inference

    result = run(make_config(tmp_path, method="lora"))
    assert (result.final_dir / "adapter_model.safetensors").exists()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), result.final_dir).eval()
    ours, _, meta = load_for_inference(result.run_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.tensor([[0, 5, 17, 300, 42, 9]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)
        assert not torch.allclose(plain(ids).logits, base(ids).logits)
    assert meta["template"] == "chatml"


def test_export_merges_the_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtune.cli import main
    from lmtune.generate import load_for_inference

    result = run(make_config(tmp_path, method="lora"))
    assert main(["export", str(result.run_dir), "--merge", "--dtype", "fp32", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter, _, _ = load_for_inference(result.run_dir)
    ids = torch.tensor([[0, 5, 17, 300, 42, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)


def test_same_seed_same_curve_bit_for_bit(tmp_path):
    first = losses(run(make_config(tmp_path, name="a", method="lora", lora_dropout=0.1, validation_split_ratio=0.2)))
    second = losses(run(make_config(tmp_path, name="b", method="lora", lora_dropout=0.1, validation_split_ratio=0.2)))
    assert first == second


def test_packing_does_not_change_what_is_learned(tmp_path):
    """Packed and padded runs train the same examples per step: the same loss curve, within float error."""
    rows = [{"instruction": "q " * (1 + i % 7), "output": "a " * (1 + 3 * (i % 5))} for i in range(32)]
    padded = losses(run(make_config(tmp_path, rows=rows, name="padded", method="full")))
    packed = losses(run(make_config(tmp_path, rows=rows, name="packed", method="full", packing=True)))
    assert packed == pytest.approx(padded, rel=1e-4)


def test_accumulation_matches_one_big_batch(tmp_path):
    """4 micro batches of 2 give the gradient of one batch of 8, normalised over all its tokens."""
    rows = [{"instruction": "q" * (1 + i % 5), "output": "a " * (1 + 3 * (i % 4))} for i in range(8)]
    common = dict(method="full", optimizer="sgd", learning_rate=1.0, max_grad_norm=0.0, max_steps=1, seed=0)
    big = run(make_config(tmp_path, rows=rows, name="big", micro_batch_size=8, **common))
    small = run(make_config(tmp_path, rows=rows, name="small", micro_batch_size=2, gradient_accumulation_steps=4, **common))
    a = load_file(big.final_dir / "model.safetensors")
    b = load_file(small.final_dir / "model.safetensors")
    worst = max(float((a[name] - b[name]).abs().max()) for name in a)
    assert worst < 1e-5, worst


def test_kill_and_resume_ends_with_the_same_weights(tmp_path):
    settings = dict(method="full", max_steps=60, save_steps=2, save_total_limit=2, lr_scheduler="cosine", warmup_steps=3)
    straight = run(make_config(tmp_path, name="straight", **settings))
    config = make_config(tmp_path, name="killed", **settings)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "lmtune", "train", str(config)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoints / "checkpoint-6" / "state.json").exists():
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final").exists(), "the run finished before it was killed"
    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(straight.final_dir / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    # and the log reads as one run: each step once, the same losses as the uninterrupted run
    assert losses(straight) == [r["loss"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]


def test_exploding_loss_stops_with_the_cause(tmp_path):
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*learning_rate 1e\+30 is likely too high"):
        run(make_config(tmp_path, method="full", learning_rate=1e30, optimizer="sgd", max_grad_norm=0.0))


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    result = run(
        make_config(
            tmp_path,
            method="lora",
            validation_split_ratio=0.25,
            eval_strategy="steps",
            eval_steps=2,
            early_stopping_patience=2,
            early_stopping_min_delta=100.0,  # nothing counts as better after the first evaluation
        )
    )
    assert result.steps == 6
    assert result.best_checkpoint.endswith("checkpoint-2")
    assert Path(result.best_checkpoint).exists()
    evals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all("eval_perplexity" in r for r in evals)


def test_outputs_of_a_run(tmp_path):
    result = run(make_config(tmp_path, method="lora", plot_loss=True, validation_split_ratio=0.25, max_steps=4))
    folder = result.run_dir
    assert (folder / "config.resolved.yaml").exists() and (folder / "summary.json").exists()
    image = (folder / "plots" / "loss.png").read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and len(image) > 5000
    records = read_metrics(folder / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "tokens_per_second"} <= set(records[0])


def test_existing_run_is_not_overwritten(tmp_path):
    path = make_config(tmp_path, method="lora", max_steps=2)
    run(path)
    with pytest.raises(TrainingError, match="already holds a run; pass --resume"):
        run(path)


def test_dropout_reaches_the_model(tmp_path):
    from lmtune.model.load import load_model

    config = load_config(make_config(tmp_path, dropout=0.3))
    model = load_model(config)
    assert model.config.attention_dropout == 0.3


def test_unknown_lora_target_lists_the_layers(tmp_path):
    from lmtune.model.load import ModelError

    with pytest.raises(ModelError, match="no linear layer named 'query'; it has down_proj, gate_proj, k_proj"):
        run(make_config(tmp_path, method="lora", lora_target=["query"]))


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_gradient_checkpointing_trains(tmp_path, method):
    settings = {**METHODS[method], "gradient_checkpointing": True}
    curve = losses(run(make_config(tmp_path, **settings)))
    assert sum(curve[-3:]) / 3 < 0.9 * curve[0], curve


def test_eval_command_on_a_run_and_on_a_checkpoint(tmp_path, capsys):
    from lmtune.cli import main

    path = make_config(tmp_path, method="lora", validation_split_ratio=0.25, save_steps=6)
    result = run(path)
    for target in (str(result.run_dir), str(result.run_dir / "checkpoints" / "checkpoint-12")):
        assert main(["eval", str(path), "--checkpoint", target]) == 0
        out = capsys.readouterr().out
        assert "examples: 8" in out
        reported = float(out.split("eval_loss: ")[1].split()[0])
        assert reported == pytest.approx(result.eval_loss, abs=1e-3)
    # a checkpoint of another method is one line naming it, not a traceback
    checkpoint = str(result.run_dir / "checkpoints" / "checkpoint-6")
    assert main(["eval", str(path), "--set", "method=full", "--checkpoint", checkpoint]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{checkpoint} does not match this config's model and method" in err
    assert main(["train", str(path), "--set", "method=full", "--resume", checkpoint]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{checkpoint} does not match this config's model and method" in err


def test_chat_prompt_answers_with_the_training_template(tmp_path, capsys):
    from lmtune.cli import main
    from lmtune.generate import answer, load_for_inference

    result = run(make_config(tmp_path, method="lora"))
    assert main(["chat", str(result.run_dir), "--prompt", "What is item 3?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tokenizer, meta = load_for_inference(result.run_dir)
    expected = answer(model, tokenizer, [[{"role": "user", "content": "What is item 3?"}]], meta["template"], max_new_tokens=8)[0]
    assert printed == expected


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])  # dropped elements kept as indices (p <= 0.5) or as a mask
def test_fused_lora_dropout_is_dropout_then_linear(p):
    """Same output and gradients as F.linear(dropout(x)) with the same mask."""
    from lmtune.model.lora_forward import _DropoutLinear, keep_mask

    x = torch.randn(4, 50, 32, requires_grad=True)
    weight = torch.randn(8, 32, requires_grad=True)
    torch.manual_seed(11)
    out = _DropoutLinear.apply(x, weight, p)
    out.square().sum().backward()
    torch.manual_seed(11)
    keep = keep_mask(x.shape, p, x.device)  # the mask the function drew
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    reference = torch.nn.functional.linear(x2 * keep / (1 - p), w2)
    reference.square().sum().backward()
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-4) and torch.allclose(weight.grad, w2.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_dropout_mask_is_independent_bernoulli(p):
    from lmtune.model.lora_forward import keep_mask

    torch.manual_seed(0)
    dropped = torch.stack([~keep_mask(torch.Size([64, 512]), p, torch.device("cpu")) for _ in range(40)]).float()
    n = dropped.numel()
    assert abs(dropped.mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
    pairs = (dropped.flatten()[1:] * dropped.flatten()[:-1]).mean().item()  # neighbours dropped together
    assert abs(pairs - p * p) < 6 * (p * p * (1 - p * p) / n) ** 0.5
    per_position = dropped.mean(0)  # no position is favoured
    assert (per_position - p).abs().max() < 6 * (p * (1 - p) / 40) ** 0.5 + 0.01


def test_lora_dropout_is_fused_into_every_adapter(tmp_path):
    from lmtune.model.load import load_model
    from lmtune.model.lora_forward import DropoutLoraA
    from lmtune.model.methods import apply_method

    config = load_config(make_config(tmp_path, method="lora", lora_dropout=0.1))
    model = apply_method(load_model(config), config)
    adapters = [m for m in model.modules() if hasattr(m, "lora_A")]
    assert adapters and all(isinstance(m.lora_A["default"], DropoutLoraA) for m in adapters)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in adapters)
    assert all(m.lora_A["default"].dropout_p == 0.1 for m in adapters)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_lora_forward_equals_peft(tmp_path, dropout):
    """Same output and gradients as peft's forward (with dropout off, where the masks cannot differ)."""
    from lmtune.model.load import load_model
    from lmtune.model.methods import apply_method

    config = load_config(make_config(tmp_path, method="lora", lora_dropout=dropout, lora_target=["all"]))
    model = apply_method(load_model(config), config)
    lean = [m for m in model.modules() if "forward" in vars(m)]
    assert lean, "no layer got the lean forward"
    for module in model.modules():  # B starts at zero in LoRA; give it values so the adapter path counts
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    ids = torch.randint(5, 200, (2, 12))
    model.eval()  # no dropout: both forwards compute the same numbers
    grads = []
    for use_lean in (True, False):
        if not use_lean:
            for module in lean:
                del module.forward
        model.zero_grad()
        out = model(input_ids=ids).logits
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], rtol=1e-4, atol=1e-6), name


def test_last_feed_forward_runs_only_where_the_loss_reads(tmp_path, monkeypatch):
    """Same loss and gradients, with the last block's MLP run on the trained positions alone."""
    from contextlib import nullcontext

    from lmtune.data.batches import pad_batch
    import lmtune.losses as loss_module
    from lmtune.model.load import load_model

    model = load_model(load_config(make_config(tmp_path)))
    rows_seen = []
    model.get_decoder().layers[-1].mlp.down_proj.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].reshape(-1, i[0].shape[-1]).shape[0]))
    examples = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * (n - 3) + list(range(5 + n - 3, 5 + n))} for n in (9, 14)]
    batch = pad_batch(examples, 0)
    results = []
    for skipping in (True, False):
        if not skipping:
            monkeypatch.setattr(loss_module, "feed_forward_only_at", lambda decoder, rows: nullcontext())
        model.zero_grad()
        total = loss_module.summed_token_loss(model, batch)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    assert rows_seen == [6, 2 * 14]  # 3 trained targets per example, read at the positions before them; then every position
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_lean_mlp_gives_the_same_numbers_and_keeps_less(tmp_path):
    from lmtune.data.batches import pad_batch
    from lmtune.losses import summed_token_loss
    from lmtune.model.lean_mlp import use_lean_mlp
    from lmtune.model.load import load_model

    model = load_model(load_config(make_config(tmp_path)))
    examples = [{"input_ids": list(range(5, 25)), "labels": list(range(5, 25))}]
    batch = pad_batch(examples, 0)

    def run():
        kept = []

        def pack(tensor):
            kept.append(tensor.numel())
            return tensor

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = summed_token_loss(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], sum(kept)

    plain = run()
    assert use_lean_mlp(model) == model.config.num_hidden_layers
    lean = run()
    assert torch.equal(plain[0], lean[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], lean[1]))
    assert lean[2] < plain[2]



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_trained_weights_leave_the_checkpoint_map_and_frozen_ones_stay(tmp_path):
    """Trainable weights get memory of their own (no copy-on-write faults in the first optimizer step), with the
    same values; frozen ones keep reading the mapped checkpoint."""
    from lmtune.model.load import _file_mappings, load_model, own_mapped_weights
    from lmtune.model.methods import apply_method

    def mapped(parameter: torch.nn.Parameter) -> bool:
        return any(start <= parameter.data_ptr() < end for start, end in _file_mappings())

    config = load_config(make_config(tmp_path, method="freeze", freeze_trainable_layers=1))
    model = apply_method(load_model(config), config)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if not any(mapped(p) for p in model.parameters()):
        pytest.skip("this transformers version does not map safetensors files")
    before = [p.detach().clone() for p in trained]
    inside = sum(mapped(p) for p in trained)
    assert inside > 0
    assert own_mapped_weights(model) == inside
    assert not any(mapped(p) for p in trained)
    assert all(torch.equal(p, b) for p, b in zip(trained, before))
    assert any(mapped(p) for p in frozen)
    assert own_mapped_weights(model) == 0  # nothing left to move


def test_collection_pauses_only_while_a_run_sets_up(tmp_path):
    import gc

    from lmtune.engine import loop

    seen = []
    setup = loop.SharedLoop.__init__

    def watched(self, *args, **kwargs):
        seen.append(gc.isenabled())
        setup(self, *args, **kwargs)

    loop.SharedLoop.__init__ = watched
    try:
        run(make_config(tmp_path, max_steps=2), on_step=lambda state: seen.append(gc.isenabled()))
    finally:
        loop.SharedLoop.__init__ = setup
    assert seen == [False, True, True]  # paused while setting up, collecting during the steps
    assert gc.get_freeze_count() == 0  # what the run froze is collectable again after it
    with pytest.raises(TrainingError):  # a setup that fails leaves collection on
        with loop.collection_paused():
            raise TrainingError("setup failed")
    assert gc.isenabled()


def test_torch_compile_compiles_the_blocks_the_loss_runs_through(tmp_path, monkeypatch):
    """torch_compile: dynamo traces the decoder blocks lmtune trains through (a whole-model wrapper would not:
    the loss reads the decoder through get_decoder()), and the loss curve is eager's within float error.
    The eager backend keeps the test to dynamo's tracing, without inductor's C++ build."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import lmtune.model.compiled as compiled

    monkeypatch.setattr(compiled, "BACKEND", "eager")
    settings = dict(method="lora", lora_r=8, learning_rate=1e-2, lora_dropout=0.0, max_steps=4)
    eager = losses(run(make_config(tmp_path, name="eager", **settings)))
    torch._dynamo.reset()
    counters.clear()
    result = run(make_config(tmp_path, name="compiled", torch_compile=True, **settings))
    assert counters["frames"]["ok"] > 0, dict(counters["frames"])
    assert losses(result) == pytest.approx(eager, rel=1e-4)
    torch._dynamo.reset()


def test_torch_compile_is_named_ignored_by_stages_with_their_own_recipe():
    from lmtune.config.load import resolve

    for stage in ("grpo", "ppo"):
        lines = [str(p) for p in resolve(data={"stage": stage, "torch_compile": True}).problems]
        assert f"warning: torch_compile: ignored with stage: {stage}, which runs a recipe of its own; set torch_compile: false" in lines, lines
    assert not [p for p in resolve(data={"stage": "sft", "torch_compile": True}).problems if p.key == "torch_compile"]
