"""rm: a scalar reward head on a causal LM, trained on preference pairs.

The model is the base loaded as transformers' `AutoModelForSequenceClassification`
with one label, so a full-method run saves a model plain transformers loads the
same way, and a LoRA run a PEFT adapter with the head saved beside it. The
reward is the head's output at each sequence's last real token (padding- and
packing-aware); the loss is -log sigmoid(r_chosen - r_rejected - margin), the
margin being the data's optional `margin` column.
"""

from __future__ import annotations

from typing import Any

from ..lazy import lazy
from .pairs import PairObjective, PairStage

torch = lazy("torch")
F = lazy("torch.nn.functional")
batching = lazy("lmtune.data.batches")
losses = lazy("lmtune.losses")
last_block = lazy("lmtune.model.last_block")


def reward_parts(model: Any) -> tuple[Any, Any]:
    """(the decoder, the scalar head) of a sequence-classification model, with or without a PEFT wrapper."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    hf = getattr(hf, "module", hf)
    return hf.base_model, hf.score


def rewards(model: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """One reward per sequence of the batch, read at its last real token."""
    decoder, head = reward_parts(model)
    rows = losses.last_token_rows(batch)
    inputs = batching.attention_inputs(batch, getattr(decoder.config, "_attn_implementation", None))
    with last_block.feed_forward_only_at(decoder, rows):
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
    last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    weight = head.weight if hasattr(head, "weight") else next(head.parameters())
    return head(last.to(weight.dtype)).squeeze(-1).float()


class RewardModel(PairObjective):
    def called_apart(self, model: Any) -> list[Any]:
        return list(reward_parts(model))

    def summed_loss(self, model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        scores = rewards(model, batch)
        pairs = int(batch["pairs"])
        chosen, rejected = scores[:pairs], scores[pairs:]
        margin = batch["margin"].to(scores) if "margin" in batch else 0.0
        loss = -F.logsigmoid(chosen - rejected - margin)
        metrics = {
            "pair_accuracy": (chosen > rejected).float().sum().detach(),
            "reward_margin": (chosen - rejected).sum().detach(),
        }
        return loss.sum(), metrics


class RewardModelling(PairStage):
    name = "rm"
    summary = "a reward model on preference pairs"
    head = "reward"

    def objective(self, config: Any) -> RewardModel:
        return RewardModel()


RM = RewardModelling()
