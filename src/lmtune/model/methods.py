"""Which weights train: full, freeze, LoRA, QLoRA / 8-bit LoRA."""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import Config
from .load import ModelError

ATTENTION_WORDS = ("attn", "attention")
MLP_WORDS = ("mlp", "feed_forward", "ffn")


REWARD_HEADS = ("score", "classifier")  # scalar heads: trained whole, never given adapters
ROUTERS = ("gate", "router")  # a mixture of experts' router (Llama's gate_proj is a feed-forward layer)


def linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every linear layer but the output head, by full name (quantised linears included)."""
    head = model.get_output_embeddings()
    out = {}
    for name, module in model.named_modules():
        if module is head or name.rsplit(".", 1)[-1] in REWARD_HEADS:
            continue
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Linear4bit", "Linear8bitLt"):
            out[name] = module
    return out


def expert_weights(model: torch.nn.Module) -> list[str]:
    """The fused expert weights of a mixture of experts (3-D parameters of its `experts` modules), as
    `experts.<name>`: what LoRA's `experts` group adapts (peft's target_parameters)."""
    found = set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.dim() == 3 and len(parts) >= 2 and parts[-2] == "experts":
            found.add(f"experts.{parts[-1]}")
    return sorted(found)


def lora_targets(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """Leaf names to wrap, from module names and the groups attention / mlp / ff / all. The groups leave a
    mixture of experts' router alone (adapting how tokens are routed unsettles training); name it to adapt it."""
    layers = linear_layers(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
    grouped = [n for n in layers if n.rsplit(".", 1)[-1] not in ROUTERS]
    chosen: set[str] = set()
    for item in wanted:
        if item == "all":
            chosen |= {n.rsplit(".", 1)[-1] for n in grouped}
        elif item == "attention":
            chosen |= {n.rsplit(".", 1)[-1] for n in grouped if any(w in n for w in ATTENTION_WORDS)}
        elif item in ("mlp", "ff"):
            chosen |= {n.rsplit(".", 1)[-1] for n in grouped if any(w in n for w in MLP_WORDS)}
        elif item == "experts":
            if not expert_weights(model):
                raise ModelError("lora_target: experts names a mixture of experts' expert weights; this model has none")
        elif item in leaves:
            chosen.add(item)
        else:
            raise ModelError(
                f"lora_target: this model has no linear layer named {item!r}; it has {', '.join(leaves)} "
                "(or use the groups attention, mlp, all" + (", experts" if expert_weights(model) else "") + ")"
            )
    if not chosen and "experts" not in wanted:
        raise ModelError(f"lora_target: {wanted} selects no layer of this model; it has {', '.join(leaves)}")
    return sorted(chosen)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    count = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ModelError("method: freeze could not find the model's list of transformer layers")


def apply_freeze(model: torch.nn.Module, config: Config) -> None:
    f = config.finetuning
    layers = decoder_layers(model)
    count = len(layers)
    n = f.freeze_trainable_layers
    if n == 0 or abs(n) > count:
        raise ModelError(f"freeze_trainable_layers: {n} does not fit a model of {count} layers; use 1..{count} or -1..-{count}")
    chosen = range(count - n, count) if n > 0 else range(0, -n)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = f.freeze_trainable_modules
    for index in chosen:
        for name, param in layers[index].named_parameters():
            if "all" in modules or any(name.startswith(m + ".") or f".{m}." in f".{name}" for m in modules):
                param.requires_grad_(True)
    named = dict(model.named_modules())
    for extra in f.freeze_extra_modules:
        hits = [module for name, module in named.items() if name.rsplit(".", 1)[-1] == extra]
        if not hits:
            raise ModelError(f"freeze_extra_modules: no module named {extra!r} in this model")
        for module in hits:
            for param in module.parameters():
                param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"freeze_trainable_modules: {modules} matches no parameter in the chosen layers")


def apply_lora(model: torch.nn.Module, config: Config) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    f = config.finetuning
    if f.method == "qlora" or f.int8_quantization:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    experts = expert_weights(model) if "experts" in f.lora_target else None
    if experts and f.lora_dropout:
        raise ModelError("lora_target: experts: peft's adapters on fused expert weights take no dropout; set lora_dropout: 0")
    lora = LoraConfig(
        r=f.lora_r,
        lora_alpha=f.lora_alpha if f.lora_alpha is not None else 2 * f.lora_r,
        lora_dropout=f.lora_dropout,
        target_modules=lora_targets(model, f.lora_target) or None,
        target_parameters=experts,
        modules_to_save=f.lora_modules_to_save or None,
        # SEQ_CLS makes peft train the reward head whole and save it beside the adapter.
        task_type="SEQ_CLS" if _has_reward_head(model) else "CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        if "ParamWrapper" not in str(exc):
            raise
        # peft maps the names transformers 4 gave each expert's layers (down_proj, ...) onto the fused experts
        raise ModelError(f"lora_target: on {model.config.model_type}, {', '.join(f.lora_target)} also adapts the fused expert "
                         "weights (peft maps the feed-forward names onto them), whose adapters take no dropout; set "
                         "lora_dropout: 0, or lora_target: attention") from None
    from .lora_forward import use_lean_lora

    use_lean_lora(model)  # peft's mathematics with less activation memory and fewer passes (see lora_forward)
    return model


def _has_reward_head(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "score", None), torch.nn.Linear)


def apply_method(model: torch.nn.Module, config: Config) -> Any:
    method = config.finetuning.method
    if config.training.gradient_checkpointing:
        non_reentrant = {"use_reentrant": False}  # works with frozen inputs (LoRA, quantised bases)
        if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "freeze":
        apply_freeze(model, config)
        if _has_reward_head(model):
            model.score.requires_grad_(True)
    else:
        model = apply_lora(model, config)
    if config.training.gradient_checkpointing and method != "full":
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
    from .lean_mlp import use_lean_mlp
    from .rms_norm import use_fused_rms_norm
    from .rotary import use_fused_rotary

    use_lean_mlp(model)  # the same numbers, a quarter fewer feed-forward activations kept (see lean_mlp)
    use_fused_rms_norm(model)  # the same forward, a backward in fewer passes over memory (see rms_norm)
    use_fused_rotary(model)  # the same numbers in fewer passes over queries and keys (see rotary)
    return model


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
