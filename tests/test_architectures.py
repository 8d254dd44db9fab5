"""Packing is exact on every architecture users fine-tune, or refused in one line.

Tiny random models of each architecture are built in code from their
transformers configs, with sliding windows shorter than the longest example,
soft-capped attention and logits (Gemma 2), tied embeddings and biases, and
the attention implementation each model asks for. Packed and padded batches
must give the same loss and gradients; a LoRA and a full run through
`lmtune train` must learn.
"""

import json

import pytest
import torch

from lmtune.config.load import resolve
from lmtune.data.batches import packed_batch, pad_batch
from lmtune.engine.loop import train
from lmtune.losses import summed_token_loss
from lmtune.engine.report import read_metrics
from lmtune.model.packed_attention import PackingNotExact, packing_obstacle, switch_to_packed, use_packed_attention
from lmtune.model.rms_norm import use_fused_rms_norm
from lmtune.model.rotary import use_fused_rotary
from lmtune.plan import FUSED_RMS_NORMS

WINDOW = 16  # shorter than the longest example below
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ARCHITECTURES = {
    "llama": dict(),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),  # biases on q/k/v
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "mistral": dict(sliding_window=WINDOW),
    "gemma2": dict(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(sliding_window=WINDOW),
    "gpt_neox": dict(),
}


def build(kind, vocab_size=128, **special):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=vocab_size, **SIZES, **ARCHITECTURES[kind], **special)
    torch.manual_seed(0)
    # What transformers picks for the model (Gemma 2 cannot use SDPA: it falls back to eager).
    return AutoModelForCausalLM.from_config(config).float()


def examples():
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in (40, 7, 25, 33):  # two are longer than the window
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = summed_token_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_packed_equals_padded_loss_and_gradients(kind):
    model = build(kind, pad_token_id=0)
    model.train()
    padded_loss, padded_grads = loss_and_grads(model, pad_batch(examples(), 0))
    use_packed_attention(model)
    packed_loss, packed_grads = loss_and_grads(model, packed_batch(examples()))
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5), (kind, float(packed_loss), float(padded_loss))
    for name, grad in padded_grads.items():
        scale = grad.abs().max() + 1e-12
        assert (packed_grads[name] - grad).abs().max() / scale < 1e-4, (kind, name)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("norms_trained", [True, False])
def test_fused_rms_norms_give_the_same_loss_and_gradients(kind, norms_trained):
    """Every RMS norm takes the one-function forward (GPT-NeoX has LayerNorms, left alone); the loss is the
    same number and every gradient the same within rounding, with the norm scales trained (full) or frozen."""
    model = build(kind, pad_token_id=0)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(norms_trained or "norm" not in name)
    batch = pad_batch(examples(), 0)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    kept_plain = kept_elements(model, batch)
    rms_norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    assert use_fused_rms_norm(model) == rms_norms
    assert rms_norms > 0 or kind == "gpt_neox"
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert torch.equal(fused_loss, plain_loss), kind
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert (fused_grads[name] - grad).abs().max() / (grad.abs().max() + 1e-12) < 1e-5, (kind, name)
    if rms_norms and norms_trained:
        assert kept_elements(model, batch) < kept_plain  # the normalised outputs are no longer kept


ROTARY_AS_LLAMA = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"}  # phi3 and gpt_neox rotate their own way


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_fused_rotary_gives_bit_for_bit_the_same_loss_and_gradients(kind, monkeypatch):
    """Llama's rotary code (copied into most decoders) takes the one-function rotation, with the same
    numbers to the last bit, packed; the models that rotate another way keep their own code."""
    import sys

    model = build(kind, pad_token_id=0)
    model.train()
    use_packed_attention(model)
    batch = packed_batch(examples())
    modeling = sys.modules[type(model).__module__]
    ours = getattr(modeling, "apply_rotary_pos_emb", None)
    if hasattr(ours, "lmtune_original"):  # an earlier test in this process already fused it: compare with the original
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", ours.lmtune_original)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    assert use_fused_rotary(model) == (kind in ROTARY_AS_LLAMA)
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert torch.equal(fused_loss, plain_loss), kind
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(fused_grads[name], grad), (kind, name)
    if kind in ROTARY_AS_LLAMA:  # and the rotation in the graph is the fused one
        assert "_RotatedBackward" in graph_node_names(summed_token_loss(model, batch).grad_fn)


def graph_node_names(node, seen=None):
    seen = set() if seen is None else seen
    if node is not None and node not in seen:
        seen.add(node)
        for parent, _ in node.next_functions:
            graph_node_names(parent, seen)
    return {type(n).__name__ for n in seen}


@pytest.mark.parametrize("model_type", sorted(FUSED_RMS_NORMS))
def test_plan_counts_fused_norms_only_where_they_are_fused(model_type):
    """`plan` leaves out the normalised outputs for these model types: each one's RMS norms must take the fused forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small_experts = dict(num_experts=4, num_local_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    config = AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, **SIZES, **small_experts)
    model = AutoModelForCausalLM.from_config(config)
    rms_norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())
    assert rms_norms > 0 and use_fused_rms_norm(model) == rms_norms


def kept_elements(model, batch):
    kept = []

    def pack(tensor):
        kept.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        summed_token_loss(model, batch)
    return sum(kept)


def test_the_window_matters_here():
    """Without the window the packed loss would differ: the test above could fail."""
    model = build("mistral", pad_token_id=0)
    padded, _ = loss_and_grads(model, pad_batch(examples(), 0))
    unwindowed = build("mistral", pad_token_id=0)
    unwindowed.config.sliding_window = None
    use_packed_attention(unwindowed)
    packed, _ = loss_and_grads(unwindowed, packed_batch(examples()))
    assert not torch.allclose(packed, padded, rtol=1e-5)


def test_models_packing_cannot_be_exact_for_are_refused_in_one_line():
    from transformers import AutoConfig

    bidirectional = AutoConfig.for_model("gemma3_text", **SIZES, use_bidirectional_attention=True)
    assert "use_bidirectional_attention" in packing_obstacle(bidirectional)
    model = build("gemma3_text")
    model.config.use_bidirectional_attention = True
    with pytest.raises(PackingNotExact, match="set packing: false"):
        switch_to_packed(model, True)
    on, note = switch_to_packed(model, None)  # the default: padded batches, and the reason said
    assert on is False and "use_bidirectional_attention" in note
    assert switch_to_packed(build("llama"), False) == (False, None)


def saved_models(root, tiny_dir, kinds, builder):
    """Each kind built by `builder(kind, vocab_size=..., **token ids)` and saved with lmtune's builtin tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folders = {}
    for kind in kinds:
        folders[kind] = root / kind
        builder(kind, vocab_size=len(tokenizer), **ids).save_pretrained(folders[kind], safe_serialization=True)
        tokenizer.save_pretrained(folders[kind])
    return folders


def learning_run(folder, method, tmp_path, **changes):
    """A short counting run on a model folder: the settings both architecture matrices train with."""
    rows = [{"instruction": f"Count to {i % 5}, slowly and clearly please", "output": " ".join(str(j) for j in range(i % 5 + 3))} for i in range(24)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "base_model": str(folder), "dataset": str(data), "template": "chatml", "method": method,
        "micro_batch_size": 4, "max_steps": 8, "learning_rate": 1e-2 if method == "lora" else 2e-3,
        "lr_scheduler": "constant", "logging_steps": 1, "lora_target": ["all"], "seed": 0,
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "plot_loss": False, **changes,
    }
    result = train(resolve(data=settings).config, quiet=True)
    return result, [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def arch_folders(tmp_path_factory, tiny_dir):
    """Each architecture saved as a model folder with lmtune's builtin tokenizer."""
    return saved_models(tmp_path_factory.mktemp("archs"), tiny_dir, ARCHITECTURES, build)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_a_run_learns(kind, method, arch_folders, tmp_path):
    result, records = learning_run(arch_folders[kind], method, tmp_path)
    assert not result.notes, result.notes  # packed (the default), with nothing to report
    curve = [r["loss"] for r in records]
    assert sum(curve[-2:]) / 2 < 0.93 * curve[0], (kind, method, curve)


def preference_pairs():
    """Prompts longer and shorter than the window, answers of one token and of many."""
    generator = torch.Generator().manual_seed(3)
    pairs = []
    for prompt_length, chosen_length, rejected_length in ((30, 5, 9), (4, 12, 3), (20, 1, 25)):
        prompt, chosen, rejected = (torch.randint(3, 128, (n,), generator=generator).tolist() for n in (prompt_length, chosen_length, rejected_length))
        pairs.append({
            "chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * prompt_length + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * prompt_length + rejected,
        })
    return pairs


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_pairs_sharing_their_prompt_give_the_same_log_probabilities_and_gradients(kind):
    from lmtune.data.batches import Batches
    from lmtune.losses import sequence_logps
    from lmtune.stages.pairs import PairShape

    model = build(kind, pad_token_id=0)
    use_packed_attention(model)
    pairs = preference_pairs()
    results = []
    for share in (False, True):
        batch = Batches(pairs, len(pairs), 0, packing=True, shuffle=False, shape=PairShape(share_prompts=share)).collate(pairs)
        model.zero_grad()
        sums, tokens = sequence_logps(model, batch)
        sums.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((sums.detach(), tokens, grads, batch["input_ids"].numel()))
    (plain, plain_tokens, plain_grads, plain_positions), (shared, shared_tokens, shared_grads, shared_positions) = results
    assert torch.equal(plain_tokens, shared_tokens)
    assert torch.allclose(plain, shared, rtol=1e-5, atol=1e-5), (kind, plain, shared)
    for name, grad in plain_grads.items():
        assert (shared_grads[name] - grad).abs().max() / (grad.abs().max() + 1e-12) < 1e-4, (kind, name)
    assert shared_positions == plain_positions - (30 + 4 + 20)  # each prompt computed once
