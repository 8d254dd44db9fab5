"""The router's load-balancing loss of mixture-of-experts models, as their own forward adds it.

Qwen-MoE, Mixtral, GPT-OSS and others define `router_aux_loss_coef`; transformers adds
coef x load_balancing_loss to the language-model loss only when `output_router_logits` is
on, which their configs leave off. lmtune computes its own token loss from the decoder's
hidden states, so it asks the decoder for the router logits and adds the same term
whenever the model defines a coefficient above 0, and logs it as `router_aux_loss`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def experts_of(config: Any) -> int:
    return next((int(getattr(config, k)) for k in EXPERT_COUNTS if getattr(config, k, None)), 0)


def router_aux_coef(model: Any) -> float:
    """The model's coefficient when it is a mixture of experts with a load-balancing loss of its own, else 0."""
    config = model.config
    coef = getattr(config, "router_aux_loss_coef", None) or 0.0
    return float(coef) if experts_of(config) > 1 and _balancing_loss(model) is not None else 0.0


def _balancing_loss(model: Any) -> Optional[Callable]:
    base = getattr(model, "get_base_model", lambda: model)()
    module = importlib.import_module(type(base).__module__)
    return getattr(module, "load_balancing_loss_func", None)


def router_aux_loss(model: Any, router_logits: tuple, attention_mask: Any) -> Any:
    """The model's own load-balancing loss over every layer's router logits (padding left out by the mask)."""
    config = model.config
    return _balancing_loss(model)(router_logits, experts_of(config), config.num_experts_per_tok, attention_mask)
