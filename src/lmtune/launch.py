"""Start a command in several processes: `lmtune train CONFIG --nproc N [--nnodes ...]`.

PyTorch's elastic launcher (what `torchrun` runs) starts the processes with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. When one process
fails, the launcher stops the others, and we print the failing process's
one-line message (each process writes it to a shared folder, see
`record_failure`) instead of a page of launcher tracebacks.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .errors import UserError

FAILURES = "LMTUNE_RANK_FAILURES"


class LaunchError(UserError, RuntimeError):
    """Launch settings that cannot work (a rank beyond the node count, ...), or a process that failed:
    the message names the process and says what it said."""


def launched() -> bool:
    """Inside a process that torchrun, accelerate launch or our launcher started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def record_failure(message: str) -> None:
    """Inside a launched process: leave this process's one-line failure where the launcher finds it."""
    folder = os.environ.get(FAILURES)
    if folder:
        rank = os.environ.get("RANK", "0")
        Path(folder, f"rank-{rank}").write_text(message)


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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    address = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ.get("MASTER_PORT", 0)) or (29500 if nnodes > 1 else free_port())
    failures = tempfile.mkdtemp(prefix="lmtune-ranks-")
    os.environ[FAILURES] = failures
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
        found = sorted(Path(failures).glob("rank-*"), key=lambda p: p.stat().st_mtime)
        if found:
            raise LaunchError(f"{found[0].name.replace('-', ' ')}: {found[0].read_text().strip()}") from None
        first = min(exc.failures.values(), key=lambda f: f.timestamp)
        raise LaunchError(f"rank {first.rank} ended with exit code {first.exitcode} (its output above says why)") from None
    return 0
