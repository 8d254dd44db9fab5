"""The architectures users fine-tune in 2026, each a tiny random model built from its transformers config:
Qwen3-MoE, GPT-OSS (attention sinks, experts), DeepSeek-V3 (multi-head latent attention, experts), GLM-4 and
GLM-4.5 (fused gate_up_proj, experts), Phi-4-mini (fused qkv_proj, partial rotary, tied embeddings) and Llama 3.x
(its rope scaling); Qwen3, Gemma 3 and Mistral are in test_architectures.py.

Each packs exactly or is refused in one line, trains LoRA and full with its loss falling, has its lora_target
groups, and is counted by `plan`; the mixtures of experts with a load-balancing loss train with it and log it.
"""


import pytest
import torch

from lmtune.config.load import resolve
from lmtune.data.batches import packed_batch, pad_batch
from lmtune.model.packed_attention import PackingNotExact, switch_to_packed, use_packed_attention
from lmtune.plan import shape_of

from test_architectures import SIZES, WINDOW, examples, learning_run, loss_and_grads, saved_models

MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ARCHITECTURES_2026 = {
    "qwen3_moe": dict(head_dim=16, num_experts=4, decoder_sparse_step=1, router_aux_loss_coef=0.01, **MOE),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, sliding_window=WINDOW, router_aux_loss_coef=0.01,
                    layer_types=["sliding_attention", "full_attention"], num_experts_per_tok=2),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, **MOE),
    "glm4": dict(head_dim=16),
    "glm4_moe": dict(head_dim=16, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, **MOE),
    "phi3": dict(partial_rotary_factor=0.75, tie_word_embeddings=True),  # Phi-4-mini's shape
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 128}),  # Llama 3.1-3.3
}
NOT_PACKED = {"gpt_oss": "attention sinks"}
WITH_AUX_LOSS = {"qwen3_moe", "gpt_oss"}
EXPERTS = {"qwen3_moe", "gpt_oss", "deepseek_v3", "glm4_moe"}
LORA_RATE = {"deepseek_v3": 3e-2}  # its low-rank query and key-value paths move slowly: a higher rate, 16 steps


def build_model(kind, vocab_size=128, **special):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=vocab_size, **{**SIZES, **ARCHITECTURES_2026[kind], **special})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES_2026))
def test_packed_equals_padded_or_is_refused_in_one_line(kind):
    model = build_model(kind, pad_token_id=0)
    if kind in NOT_PACKED:
        with pytest.raises(PackingNotExact, match=NOT_PACKED[kind]):
            switch_to_packed(model, True)
        on, note = switch_to_packed(model, None)
        assert on is False and NOT_PACKED[kind] in note and "\n" not in note
        return
    model.train()
    padded_loss, padded_grads = loss_and_grads(model, pad_batch(examples(), 0))
    use_packed_attention(model)
    packed_loss, packed_grads = loss_and_grads(model, packed_batch(examples()))
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5), (kind, float(packed_loss), float(padded_loss))
    for name, grad in padded_grads.items():
        assert (packed_grads[name] - grad).abs().max() / (grad.abs().max() + 1e-12) < 1e-4, (kind, name)


@pytest.mark.parametrize("kind", sorted(WITH_AUX_LOSS))
def test_the_router_loss_is_the_one_the_model_adds_itself(kind):
    """lmtune's summed loss over a batch, divided by its tokens, is transformers' own loss with
    output_router_logits on: cross-entropy plus coef x load balancing."""
    from lmtune.stages.causal_lm import CausalLM

    model = build_model(kind, pad_token_id=0)
    batch = pad_batch(examples(), 0)
    summed, metrics = CausalLM().summed_loss(model, batch)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    labels = batch["labels"]
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, output_router_logits=True)
    assert torch.allclose(summed / tokens, theirs.loss, rtol=1e-5), (float(summed / tokens), float(theirs.loss))
    assert torch.allclose(metrics["router_aux_loss"] / tokens, theirs.aux_loss, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES_2026))
def test_plan_counts_every_parameter(kind):
    model = build_model(kind, pad_token_id=0)
    assert shape_of(model.config.to_dict()).parameters() == sum(p.numel() for p in model.parameters()), kind


def build(kind):
    return build_model(kind, pad_token_id=0)


def test_lora_target_groups_find_fused_projections_and_leave_routers_alone():
    from lmtune.model.methods import lora_targets

    assert lora_targets(build("phi3"), ["attention"]) == ["o_proj", "qkv_proj"]
    assert lora_targets(build("phi3"), ["mlp"]) == ["down_proj", "gate_up_proj"]
    assert lora_targets(build("glm4"), ["mlp"]) == ["down_proj", "gate_up_proj"]
    routed = lora_targets(build("qwen3_moe"), ["all"])
    assert "gate" not in routed and {"q_proj", "o_proj"} <= set(routed)
    assert "gate" not in lora_targets(build("deepseek_v3"), ["all"])
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"} <= set(lora_targets(build("deepseek_v3"), ["attention"]))


def test_lora_with_dropout_on_expert_weights_is_refused_in_one_line(folders, tmp_path):
    from lmtune.model.load import ModelError

    settings = {"base_model": str(folders["deepseek_v3"]), "dataset": "d.jsonl", "lora_dropout": 0.05,
                "output_dir": str(tmp_path / "run")}
    with pytest.raises(ModelError, match="set lora_dropout: 0, or lora_target: attention") as error:
        from lmtune.model.load import load_model
        from lmtune.model.methods import apply_method

        config = resolve(data=settings).config
        apply_method(load_model(config), config)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_dir):
    return saved_models(tmp_path_factory.mktemp("archs2026"), tiny_dir, ARCHITECTURES_2026, build_model)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES_2026))
def test_a_run_learns(kind, method, folders, tmp_path):
    changes = {
        "lora_target": ["all", "experts"] if kind in ("qwen3_moe", "gpt_oss") else ["all"],
        "lora_dropout": 0.0 if kind in EXPERTS else 0.05,  # peft's adapters on expert weights take no dropout
    }
    if kind in LORA_RATE:
        changes["max_steps"] = 16
        if method == "lora":
            changes["learning_rate"] = LORA_RATE[kind]
    result, records = learning_run(folders[kind], method, tmp_path, **changes)
    if kind in NOT_PACKED:
        assert any(NOT_PACKED[kind] in note for note in result.notes), result.notes
    else:
        assert not result.notes, result.notes
    curve = [r["loss"] for r in records]
    assert sum(curve[-2:]) / 2 < 0.93 * curve[0], (kind, method, curve)
    if kind in WITH_AUX_LOSS:
        assert all(r["router_aux_loss"] > 0 for r in records)
