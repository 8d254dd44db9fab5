"""The configuration: schema, foreign names, loading and rules.

The names below load on first use, so a stage module can import config.fields
(to declare its settings) while the schema is built from the stage registry.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Config": "schema", "ConfigError": "load", "Problem": "problem", "Resolved": "load",
          "load_config": "load", "resolve": "load"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
