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
    """LLaMA-Factory and SageMaker pass lists as 'a,b,c' strings."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Group(BaseModel):
    # Validators are built on first use, not at import: `explain KEY` and
    # `explain --markdown` read the field docs and never need them.
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)
