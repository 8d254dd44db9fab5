"""Keep bitsandbytes out of a process whose run never uses it.

peft imports bitsandbytes at module level whenever it is installed, and that
import registers bitsandbytes' torch ops: about 2 s on a 2-core CPU, a quarter
of a LoRA run's time to its first step. Only a quantised base (qlora,
int8_quantization) or the 8-bit optimizer call it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..config.schema import Config


def needs_bitsandbytes(config: Config) -> bool:
    f = config.finetuning
    return f.method == "qlora" or f.int8_quantization or config.training.optimizer == "adamw_8bit"


def skip_bitsandbytes() -> None:
    """For a process that will not use bitsandbytes; call it before peft is imported.

    A None entry in sys.modules is Python's own mark for an absent module:
    `import bitsandbytes` raises ImportError, and `importlib.util.find_spec`,
    which peft and transformers ask, answers None.
    """
    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        return  # already looked for, or loaded: hiding it now would leave peft inconsistent
    sys.modules["bitsandbytes"] = None


def skip_bitsandbytes_unless_needed(config: Config) -> None:
    """For a process that runs this one configuration."""
    if not needs_bitsandbytes(config):
        skip_bitsandbytes()
    elif "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        raise UserError(
            "this process already ran a configuration without bitsandbytes and hid it; "
            "run the quantised configuration in a new process"
        )
