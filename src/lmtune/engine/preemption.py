"""Stopping a run on request: SIGTERM (what SageMaker spot, Kubernetes and Slurm send before they kill)
and SIGINT (Ctrl-C).

The signal only sets a flag: the step in progress finishes, the recipe calls
`Run.end_of_step`, which writes a checkpoint and raises `Stopped`, and the
process exits 143 (SIGTERM) or 130 (SIGINT) as the shell's convention has it.
With several processes the flag travels in the step's own all-reduce, so every
process stops after the same step. A second signal more than a few seconds
after the first ends the process at once: a launcher that forwards the user's
Ctrl-C as SIGTERM (torchrun does) sends the second one within moments, and it
is the same request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

from ..errors import UserError

SAME_REQUEST_S = 5.0
CONTINUE = "; continue with --resume"  # the CLI replaces it with the whole command


class Stopped(UserError, RuntimeError):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM and SIGINT handlers for the length of a run (only in the main thread, where Python delivers them)."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received is not None else None

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGTERM)

    def install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for number in self.HANDLED:
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._at = number, now
            if os.environ.get("RANK", "0") == "0":  # every process gets the signal; one says so
                print(f"\n{signal.Signals(number).name}: finishing this step and saving a checkpoint "
                      "(signal again to stop at once, without saving)", file=sys.stderr, flush=True)
            return
        if now - self._at < SAME_REQUEST_S:
            return
        print(f"{signal.Signals(number).name} again: stopped at once; nothing saved since the last checkpoint",
              file=sys.stderr, flush=True)
        os._exit(128 + number)
