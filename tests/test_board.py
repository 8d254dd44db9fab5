"""`lmtune board` in a real browser: the system's Chromium, headless, driven by Playwright.

The server runs as `lmtune board` does, in its own process, on a fixture folder of runs; runs appear and grow
while the page is open, and one is launched from the page and trains for real.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_run(folder: Path, learning_rate: float, losses, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    values = {"base_model": "builtin:tiny", "stage": "sft", "method": "lora", "learning_rate": learning_rate,
              "max_steps": len(losses), **config}
    (folder / "config.resolved.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    lines = [{"step": i, "loss": loss, "lr": learning_rate, "grad_norm": 1.0 / i} for i, loss in enumerate(losses, 1)]
    lines.append({"step": len(losses), "eval_loss": losses[-1] + 0.1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "summary.json").write_text(json.dumps({"seconds": 2.0 * len(losses), "steps": len(losses)}))


@pytest.fixture()
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "lr-1e-3", 1e-3, [3.0, 2.0, 1.5, 1.2, 1.0])
    write_run(root / "lr-5e-3", 5e-3, [3.0, 1.6, 1.1, 0.9, 0.8])
    write_run(root / "sweep" / "lr-1e-2", 1e-2, [3.0, 1.4, 1.3, 1.35, 1.5])  # nested
    with (root / "lr-5e-3" / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")  # garbage in the middle of a log
        f.write(json.dumps({"step": 6, "loss": 0.75}) + "\n")
    (root / "no-config").mkdir()
    (root / "no-config" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "notes.txt").write_text("hello")
    return root


class Board:
    def __init__(self, root: Path, host: str = "127.0.0.1", extra=()):
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "lmtune", "board", str(root), "--host", host, "--port", str(self.port),
                                         *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.first_line = self.process.stdout.readline()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120  # a hang guard only
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/api/schema", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # it answers (with 401 when a token is needed)
            except OSError:
                time.sleep(0.1)

    def get(self, path: str, token=None):
        request = urllib.request.Request(self.url + path, headers={"X-Board-Token": token} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def close(self) -> str:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=60)
        return self.first_line + out


@pytest.fixture()
def board(runs_dir):
    served = Board(runs_dir)
    yield served
    served.close()


@pytest.fixture()
def page():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        view = browser.new_page(viewport={"width": 1400, "height": 1100})
        yield view
        browser.close()


def rows(page):
    return page.eval_on_selector_all("#runs tbody tr[data-run]", "rows => rows.map(r => r.dataset.run)")


def test_the_api_lists_the_runs_with_their_metrics_and_names_what_it_cannot_read(board):
    status, body = board.get("/api/runs")
    assert status == 200
    found = {run["name"]: run for run in json.loads(body)["runs"]}
    assert set(found) == {"lr-1e-3", "lr-5e-3", "sweep/lr-1e-2", "no-config"}
    assert found["lr-1e-3"]["status"] == "finished" and found["lr-1e-3"]["steps"] == 5 and found["lr-1e-3"]["best_loss"] == 1.0
    assert found["lr-5e-3"]["problems"] == ["metrics.jsonl line 7 is not JSON (skipped)"] and found["lr-5e-3"]["steps"] == 6
    assert found["no-config"]["problems"] == ["no config.resolved.yaml"]
    assert [r["step"] for r in found["lr-1e-3"]["metrics"] if "loss" in r] == [1, 2, 3, 4, 5]


def test_paths_outside_the_runs_folder_are_refused(board, runs_dir):
    (runs_dir.parent / "secret").mkdir()
    (runs_dir.parent / "secret" / "metrics.jsonl").write_text("{}\n")
    for path in ("/api/runs/..%2Fsecret", "/api/runs/../secret", "/api/runs/%2Fetc", "/api/compare?runs=lr-1e-3,..%2Fsecret",
                 "/api/runs/not-a-run"):
        status, _ = board.get(path)
        assert status == 404, path
    assert "refused" in board.close()


def test_a_token_is_needed_beyond_this_machine(runs_dir):
    served = Board(runs_dir, host="0.0.0.0")
    try:
        assert "?token=" in served.first_line, served.first_line
        token = served.first_line.split("?token=")[1].split()[0]
        assert served.get("/api/runs")[0] == 401
        assert served.get("/api/events")[0] == 401
        assert served.get("/api/runs", token="wrong")[0] == 401
        assert served.get("/api/runs", token=token)[0] == 200
        assert served.get(f"/api/runs?token={token}")[0] == 200
    finally:
        served.close()
    on_loopback = Board(runs_dir)
    try:
        assert "?token=" not in on_loopback.first_line and on_loopback.get("/api/runs")[0] == 200
    finally:
        on_loopback.close()


def test_the_page_shows_the_runs_and_a_new_run_grows_live(board, runs_dir, page):
    from lmtune.engine.lock import FolderLock

    page.goto(board.url)
    page.wait_for_function("document.querySelectorAll('#runs tbody tr[data-run]').length == 4")
    assert set(rows(page)) == {"lr-1e-3", "lr-5e-3", "sweep/lr-1e-2", "no-config"}
    assert "metrics.jsonl line 7 is not JSON" in page.inner_text("#runs")
    page.evaluate("window.loadedOnce = true")  # a reload would forget it
    live = runs_dir / "live"
    lock = FolderLock(live)
    lock.acquire()  # this process writes the run, as `lmtune train` would
    try:
        write_run(live, 2e-3, [3.0, 2.5])
        (live / "summary.json").unlink()
        page.wait_for_selector("tr[data-run=live] .status-running", timeout=30_000)
        page.wait_for_selector(".plot[data-metric=loss] path[data-run=live]")
        before = page.get_attribute(".plot[data-metric=loss] path[data-run=live]", "d").count("L")
        with (live / "metrics.jsonl").open("a") as f:
            for step, loss in ((3, 2.0), (4, 1.7), (5, 1.5)):
                f.write(json.dumps({"step": step, "loss": loss, "lr": 2e-3}) + "\n")
        page.wait_for_function(
            "document.querySelector('.plot[data-metric=loss] path[data-run=live]').getAttribute('d').split('L').length > %d" % (before + 3),
            timeout=30_000)
        assert page.inner_text("tr[data-run=live] .steps").startswith("5")
        assert page.evaluate("window.loadedOnce") is True
    finally:
        lock.release("finished")
    page.wait_for_selector("tr[data-run=live] .status-finished", timeout=30_000)
    for name in ("lr-1e-3", "lr-5e-3", "sweep/lr-1e-2"):
        page.check(f"tr[data-run='{name}'] input")
    page.fill("#smooth", "0.5")
    page.dispatch_event("#smooth", "input")
    shot = page.locator("main").screenshot()
    (runs_dir / "board.png").write_bytes(shot)
    if os.environ.get("LMTUNE_BOARD_SCREENSHOT"):  # set by whoever refreshes docs/board.md's picture
        (DOCS / "board.png").write_bytes(shot)
    assert page.locator(".plot[data-metric=loss] path").count() == 3


def test_comparing_two_runs_shows_exactly_their_differing_settings(board, runs_dir, page):
    write_run(runs_dir / "r16", 1e-3, [3.0, 2.0], lora_r=16, seed=1)
    write_run(runs_dir / "r8", 1e-3, [3.0, 2.1], lora_r=8, seed=1)
    page.goto(board.url)
    page.wait_for_selector("tr[data-run=r16]")
    page.check("tr[data-run=r16] input")
    page.check("tr[data-run=r8] input")
    page.click("#compare")
    page.wait_for_selector("#differences")
    keys = page.eval_on_selector_all("#differences tr[data-key]", "rows => rows.map(r => r.dataset.key)")
    assert keys == ["lora_r"]
    assert "16" in page.inner_text("#differences tr[data-key=lora_r]") and "8" in page.inner_text("#differences tr[data-key=lora_r]")


def test_the_launch_form_shows_checks_problems_and_starts_a_good_run(board, runs_dir, page):
    data = runs_dir / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    page.goto(board.url)
    page.fill("#yaml", f"base_model: builtin:tiny\ndataset: {data}\nlearning_rate: -1\n")
    page.wait_for_selector("#verdict .err >> text=learning_rate")
    assert page.is_disabled("#launch")
    page.fill("#yaml", f"base_model: builtin:tiny\ndataset: {data}\ntemplate: chatml\nmax_steps: 3\nplot_loss: false\n")
    page.fill("#name", "from-the-page")
    page.wait_for_selector("#verdict .ok")
    assert "plan:" in page.inner_text("#verdict") or "fits" in page.inner_text("#verdict")
    page.click("#launch")
    page.wait_for_selector("#verdict .ok >> text=launched from-the-page")
    page.wait_for_selector("tr[data-run=from-the-page] .status-finished", timeout=240_000)
    assert (runs_dir / "from-the-page" / "final").is_dir()
    # and then: talk to what it trained
    page.select_option("#picked", "from-the-page")
    page.fill("#message", "q1")
    page.click("#send")
    page.wait_for_selector("#conversation .model", timeout=120_000)
    assert page.inner_text("#conversation .model").startswith("model>")


def test_a_runs_sampled_answers_are_shown(board, runs_dir, page):
    rows = [{"step": 4, "prompt": "What is 2+2?", "completion": "four", "rewards": {"exact": 1.0}, "reward": 1.0}]
    (runs_dir / "lr-1e-3" / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{half")
    page.goto(board.url)
    page.wait_for_selector("#picked option[value='lr-1e-3']", state="attached")
    page.select_option("#picked", "lr-1e-3")
    page.wait_for_selector("#samples >> text=four")
    assert "What is 2+2?" in page.inner_text("#samples")


def test_stop_from_the_board_is_the_graceful_stop(board, runs_dir):
    data = runs_dir / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    config = runs_dir / "long.yaml"
    config.write_text(f"base_model: builtin:tiny\ndataset: {data}\ntemplate: chatml\nmax_steps: 100000\n"
                      f"output_dir: {runs_dir / 'long'}\nplot_loss: false\n")
    training = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300  # a hang guard only
        while time.time() < deadline:
            found = {r["name"]: r for r in json.loads(board.get("/api/runs")[1])["runs"]}
            if found.get("long", {}).get("status") == "running" and found["long"]["steps"] >= 2:
                break
            time.sleep(0.2)
        request = urllib.request.Request(board.url + "/api/stop/long", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        _, err = training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 143 and "stopped by SIGTERM" in err
    assert json.loads(board.get("/api/runs/long")[1])["status"] == "stopped"
    request = urllib.request.Request(board.url + "/api/stop/long", method="POST", data=b"")
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a stopped run was stopped again")
    except urllib.error.HTTPError as exc:
        assert exc.code == 409
