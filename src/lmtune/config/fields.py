"""How a setting is declared: its default, its documentation and its names in other tools.

The groups of config/schema.py and the stages' own settings (stages/*) are built
from these, so `explain`, the alias table and docs/configuration.md read every
setting the same way.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TOOLS = ("jumpstart", "axolotl", "llamafactory", "torchtune")


def setting(
    default: Any,
    doc: str,
    *,
    more: str = "",
    less: str = "",
    jumpstart: tuple[str, ...] = (),
    axolotl: tuple[str, ...] = (),
    llamafactory: tuple[str, ...] = (),
    torchtune: tuple[str, ...] = (),
    **constraints: Any,
) -> Any:
    """A schema field with the documentation `explain` prints.

    ``more``/``less`` say what raising/lowering the value does; the tool tuples
    are the names the same setting has elsewhere (they become plain renames in
    the alias table).
    """
    extra = {
        "more": more,
        "less": less,
        "names": {
            "jumpstart": list(jumpstart),
            "axolotl": list(axolotl),
            "llamafactory": list(llamafactory),
            "torchtune": list(torchtune),
        },
    }
    return Field(default, description=doc, json_schema_extra=extra, **constraints)


def split_commas(value: Any) -> Any:
    """LLaMA-Factory and SageMaker pass lists as 'a,b,c' strings; SageMaker also as JSON lists ('["a","b"]') or as
    Python's printing of one ("['a', 'b']", what `str(list)` in a launch script gives)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [part.strip().strip("'\"").strip() for part in text.split(",") if part.strip().strip("'\"").strip()]
    return value


class Group(BaseModel):
    # Validators are built on first use, not at import: `explain KEY` and
    # `explain --markdown` read the field docs and never need them.
    # allow_inf_nan: a `.nan` or `.inf` in YAML is a typo for every number lmtune reads, caught at check.
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True, allow_inf_nan=False)
