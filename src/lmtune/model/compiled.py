"""`torch_compile`: each decoder block compiled in place, as torchtune and accelerate compile regions.

`torch.compile(model)` would compile nothing lmtune trains through: the loss reads the decoder's hidden
states through `get_decoder()` (to run the head on trained positions only), and a compiled wrapper hands
its submodules back uncompiled. Here each decoder block (the blocks FSDP shards by: the classes the model
names in `_no_split_modules`) is compiled with `nn.Module.compile`, in place: parameter names, state dicts,
peft and FSDP wrappers stay as they are.

lmtune's own fused pieces (the LoRA dropout draw, the per-example attention of packed rows) end a graph
where they branch on data, so the blocks compile in parts around them.
"""

from __future__ import annotations

from typing import Any

from ..engine.distributed import decoder_blocks

BACKEND = "inductor"  # torch.compile's default; the tests use "eager" to keep to dynamo's tracing


def compile_blocks(model: Any) -> int:
    """Compile the model's decoder blocks in place; returns how many."""
    blocks = decoder_blocks(model, "torch_compile")
    for block in blocks:
        block.compile(backend=BACKEND)
    return len(blocks)
