"""The reference policy that dpo, kto and ppo compare against, held the cheapest way the method allows.

- LoRA / QLoRA: the policy itself with its adapter switched off; no second copy.
- full / freeze: a frozen copy of the starting weights, on every process: whole
  (replicated) with data parallelism, sharded like the policy with enable_fsdp.
- precomputed (`precompute_ref_logps`): what the stage needs from the reference
  is computed once before training, stored beside the tokenised data for these
  starting weights, and read back by resumed or repeated runs; no copy is kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from ..config.method import trains_adapters
from ..lazy import lazy

torch = lazy("torch")
distributed = lazy("lmtune.engine.distributed")


def unwrapped(model: Any) -> Any:
    return getattr(model, "module", model)  # DDP


def weights_fingerprint(model: Any) -> str:
    """Which starting weights these are: each tensor's shape, sum and absolute sum (one pass, no copy)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            values = tensor.detach().double()
            digest.update(f"{name}{tuple(tensor.shape)}{float(values.sum())!r}{float(values.abs().sum())!r}".encode())
    return digest.hexdigest()[:16]


class Reference:
    """Made before the policy's first update (and before it is sharded), from the starting weights."""

    def __init__(self, model: Any, method: str, run: Any, keep_copy: bool = True):
        self.adapters = trains_adapters(method)
        self.frozen: Optional[Any] = None
        if keep_copy and not self.adapters:
            frozen = copy.deepcopy(unwrapped(model)).eval().requires_grad_(False)
            self.frozen = run.place_frozen(frozen)

    @contextmanager
    def policy(self, model: Any) -> Iterator[Any]:
        """The reference as a module to run (no gradients): the frozen copy, or the model with its adapter off."""
        with torch.no_grad():
            if self.frozen is not None:
                yield self.frozen
            else:
                with unwrapped(model).disable_adapter():
                    yield model


def precomputed(
    model: Any, batch_sets: list[Any], run: Any, cache_folder: Optional[Path], name: str,
    values: Callable[[Any, dict, int], list[list[float]]],
) -> None:
    """Give every example of `batch_sets` its reference values under `name`, computed once by the main process with
    a frozen copy of `model` (`values(frozen, batch, examples)` -> one list per example) and stored in the data cache
    for these weights; the other processes, and later runs, read the stored file."""
    for batches in batch_sets:  # mapped cache columns give a fresh dict per read: the values need ones that stay
        if not isinstance(batches.examples, list):
            batches.examples = list(batches.examples)
    stored = cache_folder / f"{name}-{weights_fingerprint(unwrapped(model))}.json" if cache_folder else None
    with distributed.main_first(run.accelerator):
        if stored is not None and stored.exists():
            saved = json.loads(stored.read_text())
            if [len(b.examples) for b in batch_sets] == [len(v) for v in saved]:
                for batches, column in zip(batch_sets, saved):
                    for example, value in zip(batches.examples, column):
                        example[name] = value
                return
        frozen = copy.deepcopy(unwrapped(model)).eval().requires_grad_(False).to(run.accelerator.device)
        for batches in batch_sets:
            examples = batches.examples
            for start in range(0, len(examples), batches.micro_batch_size):
                chunk = examples[start : start + batches.micro_batch_size]
                batch = {k: v.to(run.accelerator.device) for k, v in batches.collate(chunk).items()}
                with torch.no_grad():
                    for example, value in zip(chunk, values(frozen, batch, len(chunk))):
                        example[name] = value
        del frozen
        if stored is not None and run.main:
            partial = stored.with_suffix(".partial")
            partial.write_text(json.dumps([[e[name] for e in b.examples] for b in batch_sets]))
            partial.replace(stored)
