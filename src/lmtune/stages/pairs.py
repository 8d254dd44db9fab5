"""What rm and dpo share: micro batches of preference pairs, and a loss averaged over pairs."""

from __future__ import annotations

from typing import Any

import torch

from ..config.schema import Config
from ..data.batches import Batches


class PairStage:
    packs = True  # a pair's chosen and rejected answers share one padding-free row
    head = "lm"
    unit = "pairs"  # what `count` counts, and what the loss is averaged over

    shares_prompts = False  # dpo: a pair's answers may share one computed prompt (see data.batches.shared_prompt_batch)

    def batches(
        self, examples: Any, config: Config, tokenizer: Any, shuffle: bool, for_eval: bool = False, packing: bool = False,
        share_prompts: bool = False,
    ) -> Batches:
        t = config.training
        size = config.evaluation.per_device_eval_batch_size if for_eval else t.micro_batch_size
        return Batches(
            examples, size, tokenizer.pad_token_id, packing=packing, shuffle=shuffle, seed=t.seed,
            share_prompts=share_prompts and self.shares_prompts,
        )

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pairs"])
