"""Helpers the tests share: fixture data, tiny training overrides, a TorchServe context for the
handler, and scripted HTTP upstreams on loopback. (Fixtures stay in ``conftest.py``.)"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from project import PROJECT_ROOT
from serving.worker import run_batch, worker_context  # noqa: F401 (run_batch: used by the tests)

if TYPE_CHECKING:
    from serving.stack import Stack

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DATA = FIXTURES / "emotion"


def copy_workspace(root: Path) -> tuple[Path, dict[str, str]]:
    """A fresh clone of the project, as near as this machine allows: ``root/repo`` holds the files
    git would hand a clone (tracked, and new files not ignored), committed to a repository of its
    own (DVC needs one), with the fixture splits where the data config looks for the shared data
    (``root/shared/data/emotion``). Returns the folder and the environment to run its commands in:
    this virtualenv first on PATH, ``EMOTION_DATA_DIR`` unset."""
    shared = root / "shared" / "data" / "emotion"
    shared.mkdir(parents=True)
    for name in ("train.txt", "val.txt"):
        shutil.copy(FIXTURE_DATA / name, shared / name)
    repo = root / "repo"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        if (PROJECT_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, repo / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("EMOTION_DATA_DIR", None)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for command in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return repo, env


def wait_for(predicate, timeout: float = 60, step: float = 0.1) -> Any:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, or None; a refused
    connection counts as not yet. Tests wait for a state, never for a number of seconds."""
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except requests.ConnectionError:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(step)


def tiny_overrides(root: Path, *extra: str, steps: int = 6, lr: float = 3e-4) -> list[str]:
    """Overrides that shrink training to a few CPU steps on the fixture splits, writing under ``root``."""
    return [
        f"data.train_file={FIXTURE_DATA / 'train.txt'}",
        f"data.val_file={FIXTURE_DATA / 'val.txt'}",
        f"paths.model_dir={root / 'model'}",
        f"paths.metrics_dir={root / 'metrics'}",
        f"paths.log_dir={root / 'logs'}",
        "train.epochs=1",
        "train.batch_size=16",
        "train.eval_batch_size=64",
        "train.max_length=32",
        f"train.max_steps={steps}",
        f"train.lr={lr}",
        # The same tiny model on every CPU: auto would train it in bf16 where the CPU has it.
        "train.precision=fp32",
        "train.log_every_n_steps=2",
        "logger=none",
        *extra,
    ]


def make_context(model_dir: Path, handler_section: dict | None = None, gpu: int | None = None) -> Any:
    """The worker context (``serving.worker``) with batchSize 8 and the given handler section;
    ``gpu`` is the gpu_id TorchServe would hand the worker."""
    return worker_context(model_dir, {"batchSize": 8, "handler": handler_section or {}}, gpu)


class ScriptedHandler(BaseHTTPRequestHandler):
    """Base for the scripted upstreams of the tests: reads the POST body, answers quietly."""

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def running_torchserve(
    model_store: Path,
    workdir: Path,
    models: str = "emotion=emotion.mar",
    timeout: float = 180,
    ready: tuple = (),
    overrides: dict[str, str] | None = None,
) -> Iterator[Any]:
    """A real TorchServe on free loopback ports, started (``emotion`` and each model of ``ready``
    with a READY worker; ``overrides`` replace config.properties values); its log's tail printed
    when it cannot start; always stopped."""
    from serving.server import TorchServe

    server = TorchServe(model_store, workdir, models, overrides)
    try:
        server.start(timeout=timeout)
        for name in ready:
            server.client.wait_ready(name, timeout, server.process)
    except Exception:
        print(server.log_tail())
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def loopback_http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free 127.0.0.1 port in a thread; yields ``host:port``; always stopped."""
    from serving.server import free_port

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_stack(model_store: Path, workdir: Path, models: str = "emotion=emotion.mar", **ts_overrides) -> Stack:
    """The whole service (TorchServe, the gateway, the supervisor) on free loopback ports, not
    started, with a keys file of its own."""
    from serving.server import free_port
    from serving.settings import GatewaySettings
    from serving.stack import Stack

    settings = GatewaySettings(port=free_port(), metrics_port=free_port())
    return Stack(
        model_store,
        workdir,
        settings,
        models=models,
        keys_file=workdir / "keys.json",
        free_ports=True,
        ts_overrides=ts_overrides or None,
        drain=0.5,
    )


def start_ready(stack: Stack) -> Stack:
    """Start and wait until ready (the readiness check compares with the archive's golden record)."""
    stack.start()
    stack.wait_ready(120)
    return stack


SCREENSHOTS = PROJECT_ROOT / "outputs" / "docs-screenshots"  # kept after the run, with the build's artifacts


def chromium_executable() -> str | None:
    """Debian's Chromium (``make system-deps`` installs it), or ``$CHROMIUM``."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def visit(browser: Any, url: str, screenshot: str | None = None) -> tuple[Any, list[str]]:
    """Open ``url`` in a new page of ``browser`` (Playwright) and wait until the network is idle;
    returns the page and its problems: console errors, uncaught exceptions, failed requests,
    answers of 400 or more, and images that did not load. ``screenshot`` names a full-page PNG in
    ``SCREENSHOTS``."""
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}") if r.status >= 400 else None)
    answer = page.goto(url, wait_until="networkidle")
    if answer is None or answer.status != 200:
        problems.append(f"{url}: {answer.status if answer else 'no answer'}")
    broken = page.eval_on_selector_all("img", "els => els.filter(e => !e.complete || !e.naturalWidth).map(e => e.src)")
    problems += [f"image not shown: {src}" for src in broken]
    if screenshot:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / screenshot), full_page=True)
    return page, problems
