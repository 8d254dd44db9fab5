"""Start a command in several processes: `lmtune train CONFIG --nproc N [--nnodes ...]`.

PyTorch's elastic launcher (what `torchrun` runs) starts the processes with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. When one process
fails, the launcher stops the others, and we print the failing process's
one-line message (each process writes it to a shared folder, see
`record_failure`) instead of a page of launcher tracebacks. A process that
dies without a word (killed, out of memory) or stops answering is named from
the launcher's own record, with the last lines it printed (each process keeps
them in the same folder, see `keep_output`), not from the survivors' socket
errors. A run stopped by SIGTERM or SIGINT on every process exits 143 or 130.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from .errors import UserError

FAILURES = "LMTUNE_RANK_FAILURES"


class LaunchError(UserError, RuntimeError):
    """Launch settings that cannot work (a rank beyond the node count, ...), or a process that failed:
    the message names the process and says what it said."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


LOST_CONTACT = ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out", "Socket Timeout",
                "Broken pipe", "Connection refused")


def launched() -> bool:
    """Inside a process that torchrun, accelerate launch or our launcher started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def record_failure(message: str) -> None:
    """Inside a launched process: leave this process's one-line failure where the launcher finds it."""
    folder = os.environ.get(FAILURES)
    if folder:
        rank = os.environ.get("RANK", "0")
        Path(folder, f"rank-{rank}").write_text(message)


def lost_contact(exc: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering."""
    return type(exc).__name__.startswith("Dist") or any(text in str(exc) for text in LOST_CONTACT)


class _Kept:
    """A stream that also appends every line to this process's log in the failures folder."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        try:
            self._log.write(text)
            self._log.flush()
        except (OSError, ValueError):
            pass
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def keep_output() -> None:
    """Inside a launched process: what it prints also goes to its log, for the launcher to quote if it dies."""
    folder = os.environ.get(FAILURES)
    if not folder or isinstance(sys.stderr, _Kept):
        return
    log = open(Path(folder, f"rank-{os.environ.get('RANK', '0')}.log"), "a", buffering=1)
    sys.stdout, sys.stderr = _Kept(sys.stdout, log), _Kept(sys.stderr, log)


def last_lines(folder: Path, rank: int, count: int = 3) -> str:
    try:
        lines = [line.strip() for line in Path(folder, f"rank-{rank}.log").read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [line.split("\r")[-1] for line in lines if line.strip()][-count:]
    return "; its last lines: " + " | ".join(lines) if lines else "; it printed nothing"


def failure_line(failures: dict[int, Any], folder: Path) -> LaunchError:
    """The one line for a failed launch: a stop on request, a process that died or hung, or what a process said."""
    said = {int(p.name.removeprefix("rank-")): p.read_text().strip() for p in Path(folder).glob("rank-*")
            if p.name.removeprefix("rank-").isdigit()}
    codes = {rank: f.exitcode for rank, f in failures.items()}
    stops = [rank for rank, code in codes.items() if code in (130, 143)]
    if stops and all(code in (130, 143) for code in codes.values()):
        first = min(stops)
        return LaunchError(said.get(first, f"rank {first} stopped on a signal"), codes[first])
    silent = sorted(rank for rank in failures if rank not in said)
    if silent:
        rank = silent[0]
        waited = any("timed out" in text.lower() or "timeout" in text.lower() for text in said.values())
        if waited:
            how = "stopped answering: the other processes waited ddp_timeout seconds for it, and it was ended"
        elif codes[rank] is not None and codes[rank] < 0:
            name = failures[rank].signal_name()
            how = f"was killed by {name}" + (" (the system's out-of-memory killer sends it, or a scheduler)" if name == "SIGKILL" else "")
        else:
            how = f"ended with exit code {codes[rank]} without a message"
        return LaunchError(f"rank {rank} {how}{last_lines(folder, rank)}; the other processes were stopped")
    first = min(said, key=lambda rank: (Path(folder, f"rank-{rank}").stat().st_mtime, rank))
    return LaunchError(f"rank {first}: {said[first]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    command: list[str],
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
) -> int:
    """Run `python COMMAND...` in `nproc` processes on this host (of `nnodes` hosts); 0 when all succeed.
    A failed process raises LaunchError with its one-line message (the others have been stopped)."""
    if nproc < 1 or nnodes < 1:
        raise LaunchError(f"--nproc {nproc} --nnodes {nnodes}: both must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank}: hosts are numbered 0 to {nnodes - 1}")
    if nnodes > 1 and not (master_addr or os.environ.get("MASTER_ADDR")):
        raise LaunchError("--nnodes > 1 needs --master-addr (or MASTER_ADDR): the host every process meets at")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    address = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ.get("MASTER_PORT", 0)) or (29500 if nnodes > 1 else free_port())
    failures = tempfile.mkdtemp(prefix="lmtune-ranks-")
    before = os.environ.get(FAILURES)
    os.environ[FAILURES] = failures  # the launched processes inherit it; this one gets its own value back at the end
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id="lmtune",
        rdzv_backend="static",
        rdzv_endpoint=f"{address}:{port}",
        rdzv_configs={"rank": node_rank, "timeout": 900},
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, sys.executable)(*command)
    except ChildFailedError as exc:
        raise failure_line(exc.failures, Path(failures)) from None
    except SignalException as exc:  # this launcher got SIGTERM/SIGINT: it passed it on to every process, which stopped
        said = Path(failures, "rank-0")
        line = said.read_text().strip() if said.exists() else f"stopped by {signal.Signals(exc.sigval).name} before the first step"
        raise LaunchError(line, 128 + int(exc.sigval)) from None
    finally:
        if before is None:
            os.environ.pop(FAILURES, None)
        else:
            os.environ[FAILURES] = before
    return 0
