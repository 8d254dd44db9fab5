"""Keep libraries out of a process whose run never uses them.

peft imports bitsandbytes at module level whenever it is installed, and that
import registers bitsandbytes' torch ops: about 2 s on a 2-core CPU, a quarter
of a LoRA run's time to its first step. Only a quantised base (qlora,
int8_quantization) or the 8-bit optimizer call it.

transformers' modeling code imports its object-detection losses, and they
import scipy.optimize when scipy is installed (0.3 s on the same CPU) for a
matcher no causal language model calls.
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


def import_modeling_without_scipy() -> None:
    """Import transformers' modeling code with scipy hidden, then show it again: the detection losses that
    would import it see no scipy and skip it, and anything else in the process (a reward function, ...) can
    still import scipy. A no-op once either is loaded."""
    if "transformers.modeling_utils" in sys.modules or "scipy" in sys.modules:
        return
    from transformers.utils import import_utils

    # transformers caches its answer to "is scipy installed?"; it is asked afresh while scipy is hidden, and
    # again after
    forget = getattr(getattr(import_utils, "is_scipy_available", None), "cache_clear", lambda: None)
    sys.modules["scipy"] = None
    forget()
    try:
        import transformers.modeling_utils  # noqa: F401
    except ImportError:
        pass  # this transformers needs scipy some other way: imported with it below
    finally:
        if "scipy" in sys.modules and sys.modules["scipy"] is None:
            del sys.modules["scipy"]
        forget()
    import transformers.modeling_utils  # noqa: F401, F811
