"""`lmtune board`: one page served from this process, offline, with a JSON API behind it.

Starlette and uvicorn (the `board` extra) are small and start in a fraction of a second; the page is one HTML
file with its own script and draws its plots as SVG, so nothing is fetched from anywhere. Live updates are
server-sent events: the server looks at the run folders' modification times once a second and tells the page
when something changed, which costs nothing measurable when idle.

Security: it binds to 127.0.0.1 unless told otherwise; on any other address every request and stream needs the
token (given, or generated and printed). It serves run data only from folders inside RUNS_DIR, launches only
`lmtune train` on a config that passes `check`, always with its output inside RUNS_DIR, and runs no code from a
request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

# The board extra; `lmtune board` checks that it is installed before importing this module.
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from . import runs

log = logging.getLogger("lmtune.board")
PAGE = Path(__file__).with_name("page.html")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}")



class TokenCheck:
    """Every request, the event stream included, carries the token (a header, or ?token= for the page's own address)."""

    def __init__(self, app: Any, token: Optional[str]):
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.token is not None:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"x-board-token", b"").decode()
            query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
            if not secrets.compare_digest(given or query.get("token", ""), self.token):
                await PlainTextResponse("a token is needed: open the address `lmtune board` printed", 401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def root_of(request: Any) -> Path:
    return request.app.state.root


def named(request: Any) -> Optional[Path]:
    """The run the path names, only inside the runs folder; anything else is logged and answered 404."""
    found = runs.inside(root_of(request), request.path_params["name"])
    if found is None:
        log.warning("refused %s: not a run inside %s", request.path_params["name"], root_of(request))
    return found


async def page(request: Any) -> Any:
    return HTMLResponse(PAGE.read_text())


async def all_runs(request: Any) -> Any:
    root = root_of(request)
    return JSONResponse({"root": str(root), "runs": [runs.summary(root, name) for name in runs.find_runs(root)]})


async def one_run(request: Any) -> Any:
    folder = named(request)
    if folder is None:
        return JSONResponse({"error": "no such run"}, 404)
    return JSONResponse({**runs.summary(root_of(request), folder.relative_to(root_of(request))), "samples": runs.samples(folder)})


async def chat(request: Any) -> Any:
    """One answer from a run's final model (adapter or full), loaded once and kept, with the run's own template."""
    body = await request.json()
    folder = runs.inside(root_of(request), str(body.get("run", "")))
    if folder is None or not (folder / "final").is_dir():
        return JSONResponse({"error": "no such run with a final model"}, 404)
    prompt = str(body.get("prompt", ""))[:4000]
    return JSONResponse(await asyncio.to_thread(reply, request.app.state.models, folder, prompt))


def reply(models: dict, folder: Path, prompt: str) -> dict[str, Any]:
    from ..generate import RunNotFound, answer, generation_settings, load_for_inference

    try:
        if folder not in models:
            models[folder] = load_for_inference(folder)
    except (RunNotFound, OSError, ValueError) as exc:
        return {"error": str(exc)}
    model, tokenizer, meta = models[folder]
    options = {**generation_settings(folder), "demarcation": meta.get("add_input_output_demarcation_key", False)}
    return {"answer": answer(model, tokenizer, [[{"role": "user", "content": prompt}]], meta.get("template"), **options)[0]}


async def compare(request: Any) -> Any:
    root = root_of(request)
    names = [n for n in request.query_params.get("runs", "").split(",") if n]
    folders = [runs.inside(root, n) for n in names]
    if len(names) < 2 or any(f is None for f in folders):
        log.warning("refused a comparison of %s", names)
        return JSONResponse({"error": "give two or more runs inside the runs folder: ?runs=a,b"}, 404)
    configs = {n: runs.read_config(f)[0] for n, f in zip(names, folders)}
    return JSONResponse({"differences": runs.differences(configs),
                         "runs": [runs.summary(root, f.relative_to(root)) for f in folders]})


async def events(request: Any) -> Any:
    """A `changed` event whenever a run's files change (looked at once a second), so the page refreshes itself."""
    root = root_of(request)

    async def stream():
        seen = None
        while not await request.is_disconnected():
            now = await asyncio.to_thread(runs.fingerprint, root)
            if now != seen:
                seen = now
                yield "event: changed\ndata: {}\n\n"
            else:
                yield ": idle\n\n"  # keeps proxies from closing the stream
            await asyncio.sleep(1.0)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def schema(request: Any) -> Any:
    from ..config.schema import GROUPS

    plain = (str, int, float, bool, list, type(None))
    settings = [{"key": key, "default": info.default if isinstance(info.default, plain) else str(info.default),
                 "doc": info.description or "", "group": group}
                for group, cls in GROUPS.items() for key, info in cls.model_fields.items()]
    return JSONResponse({"settings": settings})


async def check(request: Any) -> Any:
    body = await request.json()
    return JSONResponse(await asyncio.to_thread(judge, root_of(request), str(body.get("yaml", "")), body.get("name")))


async def launch(request: Any) -> Any:
    """`lmtune train` on a config that passes check, in its own process and session, its log beside its folder."""
    root = root_of(request)
    body = await request.json()
    verdict = await asyncio.to_thread(judge, root, str(body.get("yaml", "")), body.get("name"))
    if not verdict["ok"]:
        return JSONResponse(verdict, 400)
    name = verdict["name"]
    (root / name).mkdir(parents=True, exist_ok=True)
    config = root / f"{name}.board.yaml"
    config.write_text(verdict["resolved_yaml"])
    with open(root / f"{name}.board.log", "w") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "lmtune", "train", str(config)], stdout=log_file,
                                 stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    request.app.state.launched[name] = child
    return JSONResponse({"ok": True, "name": name, "pid": child.pid})


async def stop(request: Any) -> Any:
    """The graceful stop (SIGTERM: the step finishes and a checkpoint is saved) of a run writing on this host."""
    folder = named(request)
    if folder is None:
        return JSONResponse({"error": "no such run"}, 404)
    found = runs.holder(folder)
    if runs.status_of(folder) != "running" or not found or found.get("host") != socket.gethostname():
        return JSONResponse({"error": "that run is not running on this host"}, 409)
    os.kill(int(found["pid"]), signal.SIGTERM)
    return JSONResponse({"ok": True})


ROUTES = [
    Route("/", page), Route("/api/runs", all_runs), Route("/api/schema", schema), Route("/api/runs/{name:path}", one_run),
    Route("/api/compare", compare), Route("/api/events", events),
    Route("/api/check", check, methods=["POST"]), Route("/api/launch", launch, methods=["POST"]),
    Route("/api/stop/{name:path}", stop, methods=["POST"]), Route("/api/chat", chat, methods=["POST"]),
]


def create_app(root: Path, token: Optional[str] = None) -> Any:
    app = Starlette(routes=ROUTES, middleware=[Middleware(TokenCheck, token=token)])
    app.state.root = root.resolve()
    app.state.launched = {}
    app.state.models = {}  # run folder -> (model, tokenizer, meta), for the chat box
    return app


def judge(root: Path, text: str, name: Optional[str]) -> dict[str, Any]:
    """`check`'s verdict on a pasted config (its aliases and other tools' names included), with plan's verdict;
    the output folder is always RUNS_DIR/NAME."""
    import yaml

    from ..config.load import StrictLoader, missing_essentials, resolve

    try:
        values = yaml.load(text, Loader=StrictLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        return {"ok": False, "problems": [f"error: not valid YAML: {str(exc).splitlines()[0]}"]}
    if not isinstance(values, dict):
        return {"ok": False, "problems": ["error: the config must be a mapping of `key: value` lines"]}
    name = str(name or values.get("run_name") or "run").strip()
    if not RUN_NAME.fullmatch(name):
        return {"ok": False, "problems": [f"error: run name {name!r}: letters, digits, '.', '_' and '-' only"]}
    values["output_dir"] = str(root / name)
    for key in ("dataset", "validation_dataset", "reward_function"):  # relative paths mean inside the runs folder
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute() and (root / values[key].split(":")[0]).exists():
            values[key] = str(root / values[key])
    resolved = resolve(data=values)
    problems = list(resolved.problems)
    if resolved.config is not None:
        problems += missing_essentials(resolved.config)
    errors = [p for p in problems if p.level == "error"]
    out = {"ok": not errors and resolved.config is not None, "name": name, "problems": [str(p) for p in problems]}
    if resolved.config is not None and not errors:
        out["resolved_yaml"] = yaml.safe_dump(values, sort_keys=False)
        try:
            from ..plan import make_plan, verdict

            out["plan"] = verdict(make_plan(resolved.config, device="cpu"))
        except Exception as exc:  # noqa: BLE001 (a hub model not at hand, a model plan cannot read: the form still works)
            out["plan"] = f"plan: not available ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return out


def serve(root: Path, host: str = "127.0.0.1", port: int = 7860, token: Optional[str] = None) -> int:
    import uvicorn

    if host not in LOOPBACK and not token:
        token = secrets.token_urlsafe(16)
    shown = host if ":" not in host else f"[{host}]"
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"lmtune board: {root.resolve()} at {address}", flush=True)
    if host not in LOOPBACK:
        print("  another address than this machine's own: every request needs the token in that address", flush=True)
    logging.basicConfig(level=logging.INFO, format="board: %(message)s")
    # An open page keeps its event stream open: a stop waits for it at most 2 s.
    uvicorn.run(create_app(root, token), host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    return 0
