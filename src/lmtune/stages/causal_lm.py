"""pt and sft: next-token loss on the trained tokens (all of them for pt, the answers for sft)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config.schema import Config
from ..data.batches import Batches
from ..engine.loss import summed_token_loss, trained_tokens


class CausalLM:
    packs = True  # its batches can be laid out padding-free
    head = "lm"
    unit = "tokens"  # what `count` counts, and what the loss is averaged over

    def batches(self, examples: Any, config: Config, tokenizer: Any, shuffle: bool, for_eval: bool = False, packing: bool = False,
                pack_length: Optional[int] = None) -> Batches:
        """Micro batches laid out as one padding-free row each (packing), or padded to their longest example;
        with `pack_length`, micro batches of rows filled with examples up to that many tokens."""
        t = config.training
        return Batches(
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

    def summed_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return summed_token_loss(model, batch), {}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return trained_tokens(batch["labels"])
