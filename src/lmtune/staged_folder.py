"""Folders that appear whole or not at all (data cache, checkpoints)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """Write into the yielded hidden folder; on success it replaces `target` in one rename.

    A crash or kill mid-write leaves only the hidden folder, never a `target`
    that looks complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(parent: Path, prefix: str) -> int:
    """Staging folders of targets named `prefix...` in parent that a kill left mid-write (they never became
    complete); the number removed."""
    found = [p for p in parent.glob(f".{prefix}*") if p.is_dir()] if parent.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return len(found)
