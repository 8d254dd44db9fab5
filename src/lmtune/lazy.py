"""A module imported when first used.

Stage modules describe themselves to `check` and `explain`, which must not
import torch; their losses use torch. `torch = lazy("torch")` at the top of
such a module keeps both in one file: the import happens at the first
attribute read, inside a training run.
"""

from __future__ import annotations

import importlib
from typing import Any


class lazy:  # noqa: N801  (reads like the module it stands for)
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<lazy module {self._name}>"
