"""One mistake or remark about a config: its level, the key it is about, and what to do."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    level: str  # "error", "warning" or "note"
    key: str
    message: str
    # About this machine (a package not installed here), not the config: `plan`, which reads only config.json
    # to size a run for another machine, goes on past it.
    machine: bool = False

    def __str__(self) -> str:
        return f"{self.level}: {self.key}: {self.message}"
