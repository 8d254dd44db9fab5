"""How fast `lmtune board` starts serving, and what an idle page costs.

    python benchmarks/board.py      # writes the board section of RESULTS.md

Start: from spawning `lmtune board` to its first answer on /api/runs, against spawning `python -c pass`
(the interpreter's own start), medians of 7 alternated rounds. Idle: the server's CPU time over 30 s while a
page's event stream is connected and nothing changes, as a share of one core.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import write_section  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def runs_folder() -> Path:
    root = Path(tempfile.mkdtemp(prefix="board-bench-"))
    for n in range(3):
        run = root / f"run-{n}"
        run.mkdir()
        (run / "config.resolved.yaml").write_text(f"stage: sft\nmethod: lora\nlearning_rate: {n + 1}e-4\nmax_steps: 500\n")
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3 / s, "lr": 1e-4}) + "\n" for s in range(1, 501)))
    return root


def start_seconds(root: Path) -> tuple[float, subprocess.Popen, int]:
    port = free_port()
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "lmtune", "board", str(root), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5).read()
            return time.perf_counter() - began, server, port
        except OSError:
            time.sleep(0.005)


def python_seconds() -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - began


def idle_share(server: subprocess.Popen, port: int, seconds: float = 30.0) -> float:
    def listen():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/events", timeout=seconds + 10) as stream:
            while stream.readline():
                pass

    threading.Thread(target=listen, daemon=True).start()
    time.sleep(2.0)  # the first event and page load are not idle

    def cpu() -> float:
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu()
    time.sleep(seconds)
    return (cpu() - before) / seconds


def main() -> None:
    root = runs_folder()
    board, plain = [], []
    for _ in range(7):
        plain.append(python_seconds())
        took, server, port = start_seconds(root)
        board.append(took)
        server.terminate()
        server.wait()
    took, server, port = start_seconds(root)
    idle = idle_share(server, port)
    server.terminate()
    server.wait()
    b, p = statistics.median(board), statistics.median(plain)
    lines = [
        "## `lmtune board`: start-up and idle cost",
        "",
        f"Written by `python benchmarks/board.py` on {os.cpu_count()} cores, 3 runs of 500 steps in the folder.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| spawn to the first answer on /api/runs (median of 7) | {b:.2f} s |",
        f"| spawn of `python -c pass` (median of 7) | {p:.3f} s |",
        f"| board start / python start | {b / p:.1f}x |",
        f"| CPU of an idle server with a page's event stream open (30 s) | {idle:.2%} of one core |",
    ]
    write_section("board", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
