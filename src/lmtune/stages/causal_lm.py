"""pt and sft: next-token loss on the trained tokens (all of them for pt, the answers for sft)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from ..config.problem import Problem
from ..lazy import lazy
from .base import Objective, Stage

if TYPE_CHECKING:
    import torch

    from ..config.load import Resolved
    from ..config.schema import Config
    from ..data.batches import Batches

batching = lazy("lmtune.data.batches")
losses = lazy("lmtune.losses")
router_loss = lazy("lmtune.model.router_loss")


class CausalLM(Objective):
    """The objective of pt and sft."""

    def batches(self, examples: Any, config: "Config", tokenizer: Any, shuffle: bool, for_eval: bool = False, packing: bool = False,
                pack_length: Optional[int] = None) -> "Batches":
        """Micro batches laid out as one padding-free row each (packing), or padded to their longest example;
        with `pack_length`, micro batches of rows filled with examples up to that many tokens."""
        t = config.training
        return batching.Batches(
            examples,
            config.evaluation.per_device_eval_batch_size if for_eval else t.micro_batch_size,
            tokenizer.pad_token_id,
            packing=packing,
            group_by_length=config.data.group_by_length and not for_eval,
            shuffle=shuffle,
            seed=t.seed,
            # Evaluation takes examples as they come; only training rows are filled to a length.
            pack_length=pack_length if packing and not for_eval else None,
        )

    def summed_loss(self, model: Any, batch: dict[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        coef = router_loss.router_aux_coef(model)
        if not coef:
            return losses.summed_token_loss(model, batch), {}
        # A mixture of experts with a load-balancing loss: added as its own forward adds it (per token, so the
        # step's division by its token count leaves coef x the average).
        found: list = []
        per_token, keep = losses.token_losses(model, batch, router=found)
        aux = router_loss.router_aux_loss(model, found[0], batch.get("attention_mask")) * keep.sum()
        return per_token.sum() + coef * aux, {"router_aux_loss": aux.detach()}

    def count(self, batch: dict[str, "torch.Tensor"]) -> int:
        return losses.trained_tokens(batch["labels"])


class CausalLMStage(Stage):
    packs_to_length = True

    def objective(self, config: "Config") -> CausalLM:
        return CausalLM()


class Pretraining(CausalLMStage):
    name = "pt"
    summary = "continued pre-training on raw text"
    reads = frozenset({"text"})

    def rules(self, r: "Resolved") -> list[Problem]:
        if r.config.data.template is not None:
            return [Problem("warning", "template", "ignored with stage: pt; raw text is trained as it is")]
        return []


class SupervisedFineTuning(CausalLMStage):
    name = "sft"
    summary = "supervised fine-tuning on responses"
    reads = frozenset({"chat", "completion"})

    def rules(self, r: "Resolved") -> list[Problem]:
        if r.config.data.dataset_format == "text":
            return [Problem("error", "dataset_format", "sft learns responses and raw text has none; use stage: pt for raw text")]
        return []


PT, SFT = Pretraining(), SupervisedFineTuning()
