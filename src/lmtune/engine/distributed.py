"""Several processes: data parallelism (DDP) or sharding (FSDP2), and the gathered state checkpoints need.

Every process runs the same recipe. Data: process `rank` takes every `world`-th
micro batch of one global order (data/batches.py), so the examples of a step do
not depend on the process count. Model: with `enable_fsdp`, each decoder block
and then the whole model go through FSDP2's `fully_shard` (parameters,
gradients and optimizer states split across processes); otherwise every
process keeps the whole model and the gradients are averaged once per step
(`average_gradients`, gloo on CPU, nccl on CUDA). Checkpoints and the final model hold whole (gathered) tensors
in the single-process format, so a run resumes with any process count.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import UserError
from ..model.sharded import fsdp2, is_sharded  # noqa: F401  (is_sharded: read by the recipes)

if TYPE_CHECKING:
    from ..config.schema import Config


class DistributedError(UserError, RuntimeError):
    """A multi-process setup that cannot run as configured."""


def decoder_blocks(model: Any, setting: str = "enable_fsdp") -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names transformers marks as not to be split (LlamaDecoderLayer, ...),
    read from every transformers model inside `model` (a PEFT wrapper, or a policy beside a value head). Matched
    by the class's lineage: FSDP2 gives each block it shards a subclass of its own (FSDPLlamaDecoderLayer).
    `setting`: the config key that needs them, named in the error when there are none."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise DistributedError(f"{setting}: {type(model).__name__} names no decoder block class; set {setting}: false")
    return blocks


def shard(model: torch.nn.Module, config: "Config", accelerator: Any, apart: Any = ()) -> tuple[torch.nn.Module, list[str]]:
    """FSDP2 over the processes: one unit per decoder block, one per module in `apart` (called on their own by the
    loss), the rest (embeddings, head, final norm) in the root unit. Returns the model and notes for the user."""
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, _, MixedPrecisionPolicy, CPUOffloadPolicy = fsdp2()
    d = config.distributed
    notes: list[str] = []
    world = accelerator.num_processes
    device = accelerator.device
    model.to(device)
    if d.fsdp_sharding_strategy == "hybrid_shard":
        per_host = int(__import__("os").environ.get("LOCAL_WORLD_SIZE", world))
        mesh = init_device_mesh(device.type, (world // per_host, per_host), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    options: dict[str, Any] = {"mesh": mesh}
    # shard_grad_op keeps each block's gathered parameters from forward to backward (ZeRO-2): more memory, less traffic.
    reshard = d.fsdp_sharding_strategy != "shard_grad_op"
    if config.precision.precision in ("bf16", "fp16"):
        low = torch.bfloat16 if config.precision.precision == "bf16" else torch.float16
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    if d.fsdp_offload_params:
        if device.type != "cuda":
            notes.append("fsdp_offload_params: parameters already live in CPU memory on a CPU run; nothing to offload")
        else:
            options["offload_policy"] = CPUOffloadPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, reshard_after_forward=reshard, **options)
    for module in apart:
        fully_shard(module, reshard_after_forward=reshard, **options)
    fully_shard(model, reshard_after_forward=reshard, **options)
    return model, notes


@contextmanager
def gradient_sync(model: Any, sync: bool) -> Iterator[None]:
    """FSDP2, accumulating micro batches: gradients are reduce-scattered only after the last one of a step."""
    if sync or not is_sharded(model):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


BUCKET_BYTES = 32 * 2**20


def average_gradients(model: torch.nn.Module, world: int) -> None:
    """Data parallelism: every process's gradients replaced by their mean, one all-reduce per 32 MiB bucket.

    Done once per optimizer step, after the step's last backward, over every trainable parameter in
    one fixed order (a missing gradient counts as zeros), so all processes exchange the same buckets.
    The model keeps its own forward (no wrapper), so the loss's fast paths work as in one process."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for dtype in sorted({g.dtype for g in grads}, key=str):
        bucket: list[torch.Tensor] = []
        size = 0
        same = [g for g in grads if g.dtype == dtype]
        for index, grad in enumerate(same):
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            if size >= BUCKET_BYTES or index == len(same) - 1:
                flat = _flatten_dense_tensors(bucket)
                torch.distributed.all_reduce(flat)
                flat /= world
                for grad_in, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    grad_in.copy_(synced)
                bucket, size = [], 0


def as_local(tensor: Any) -> torch.Tensor:
    """A whole tensor from a DTensor (a gradient norm under FSDP2), or the tensor itself."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else torch.as_tensor(tensor)


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as whole CPU tensors. Under FSDP2 every process must call it (it gathers)."""
    return {name: as_local(p.detach()).cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole, on the CPU of the main process (for save_pretrained); a gather every process joins."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, whole tensors: the same for any process count."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def load_full_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Whole tensors into a model, sharding them where the model is sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))


def main_first(accelerator: Any) -> Any:
    """The main process builds the tokenised-data cache first; the others then read it."""
    return accelerator.main_process_first() if accelerator.num_processes > 1 else nullcontext()


def leave_process_group() -> None:
    """At the end of a launched run: every process has passed the run's last barrier, so each takes its process
    group down itself. Left to the interpreter's exit, gloo's threads were sometimes destroyed while still
    joinable, and a process that had finished its work aborted ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
