"""pt and sft: next-token loss on the trained tokens (all of them for pt, the answers for sft)."""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import Config
from ..data.batches import Batches
from ..engine.loss import summed_token_loss, trained_tokens


class CausalLM:
    def batches(self, examples: Any, config: Config, tokenizer: Any, shuffle: bool, for_eval: bool = False) -> Batches:
        """Padded micro batches, or with packing the same examples in one padding-free row."""
        d, t = config.data, config.training
        return Batches(
            examples,
            config.evaluation.per_device_eval_batch_size if for_eval else t.micro_batch_size,
            tokenizer.pad_token_id,
            packing=d.packing and not for_eval,
            group_by_length=d.group_by_length and not for_eval,
            shuffle=shuffle,
            seed=t.seed,
        )

    def summed_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_token_loss(model, batch)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return trained_tokens(batch["labels"])
