"""One writer per run folder.

Two runs writing one output_dir interleave their metrics and overwrite each
other's checkpoints and summary. The writer holds `output_dir/.lmtune.lock`:
an advisory `flock` on it (released by the kernel when the holder dies, on this
host) and, in it, who holds it (host, pid, start time), so that a run on
another host sharing the folder is named too. The holder touches the file
every half minute: a record from another host that has not been touched for
five minutes is a holder that is gone (a spot instance replaced, a SageMaker job
restarted with its checkpoint folder). A lock whose holder is gone is taken
over; a live one refuses the second run in one line.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional

NAME = ".lmtune.lock"
HEARTBEAT_S = 30.0
GONE_AFTER_S = 300.0


class RunLocked(Exception):
    """Raised with the line that names the live holder; the caller wraps it in its own error type."""


def holder(folder: Path) -> Optional[dict[str, Any]]:
    """Who holds the folder's lock (host, pid, started), or None when nobody does or it cannot be read."""
    try:
        found = json.loads((folder / NAME).read_text() or "null")
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def alive(found: dict[str, Any], folder: Path) -> bool:
    """The holder still runs: a live pid on this host, or a record from another host touched in the last minutes."""
    if found.get("released") or not found.get("pid"):
        return False
    if found.get("host") != socket.gethostname():
        try:
            return time.time() - (folder / NAME).stat().st_mtime < GONE_AFTER_S
        except OSError:
            return False
    try:
        os.kill(int(found.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class FolderLock:
    """Held from the start of a run to its end (or the process's)."""

    def __init__(self, folder: Path, sole_writer: bool = False):
        """`sole_writer`: nothing else can write this folder (a SageMaker job's checkpoint folder, which the job
        restores from S3 with the lock of the instance it ran on before), so another host's record is stale."""
        self.folder, self.sole_writer = folder, sole_writer
        self._fd: Optional[int] = None
        self._stop = threading.Event()

    def acquire(self) -> None:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunLocked(self._refusal(holder(self.folder))) from None
        found = holder(self.folder)
        # The flock is ours, so no live process on this host holds the folder; one on another host may (flock is
        # not shared over every network file system), and its record then still names it.
        if found and not self.sole_writer and found.get("host") != socket.gethostname() and alive(found, self.folder):
            os.close(fd)
            raise RunLocked(self._refusal(found, remote=True))
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        threading.Thread(target=self._beat, args=(path,), daemon=True, name="lmtune-lock").start()

    def _beat(self, path: Path) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                pass

    def _refusal(self, found: Optional[dict[str, Any]], remote: bool = False) -> str:
        who = f"pid {found.get('pid')} on {found.get('host')}, started {found.get('started')}" if found else "another process"
        line = f"output_dir: {self.folder} is being written by a live run ({who}); wait for it to end, stop it, or choose another output_dir"
        if remote:
            line += f" (if that run is gone, this lock is taken over {GONE_AFTER_S / 60:.0f} minutes after its last sign of life)"
        return line

    def release(self, outcome: Optional[str] = None) -> None:
        """`outcome` (finished, stopped, failed) stays in the file for whoever reads the folder (`lmtune board`)."""
        self._stop.set()
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps({"released": True, **({"outcome": outcome} if outcome else {})}).encode(), 0)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
