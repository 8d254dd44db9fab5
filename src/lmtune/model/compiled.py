"""`torch_compile`: each decoder block compiled in place, as torchtune and accelerate compile regions.

`torch.compile(model)` would compile nothing lmtune trains through: the loss reads the decoder's hidden
states through `get_decoder()` (to run the head on trained positions only), and a compiled wrapper hands
its submodules back uncompiled. Here every block of the classes the model names as its unsplittable units
(`_no_split_modules`, the decoder layers) is compiled with `nn.Module.compile`, in place: parameter names,
state dicts, peft and FSDP wrappers stay as they are.

lmtune's own fused pieces (the LoRA dropout draw, the per-example attention of packed rows) end a graph
where they branch on data, so the blocks compile in parts around them.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

BACKEND = "inductor"  # torch.compile's default; the tests use "eager" to keep to dynamo's tracing


def compile_blocks(model: Any) -> int:
    """Compile the model's decoder blocks in place; returns how many."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # by the class's lineage: FSDP2 gives each sharded block a subclass of its own (FSDPLlamaDecoderLayer)
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise UserError(f"torch_compile: {type(model).__name__} names no decoder block class to compile; set torch_compile: false")
    for block in blocks:
        block.compile(backend=BACKEND)
    return len(blocks)
