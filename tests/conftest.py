"""Shared fixtures: tiny configs, a tiny trained model, its archive, and a live TorchServe."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import DictConfig

from training.config import compose

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DATA = FIXTURES / "emotion"


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


def tiny_overrides(root: Path, *extra: str) -> list[str]:
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
        "train.max_steps=6",
        "train.lr=3e-4",
        "train.log_every_n_steps=2",
        "logger=none",
        *extra,
    ]


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    """A training config that runs in seconds and writes only under ``tmp_path``."""
    return compose(tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory produced by a real (tiny) training run, shared by the session."""
    from training.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    train(compose(tiny_overrides(root)))
    return root / "model"


@pytest.fixture(scope="session")
def model_store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding ``emotion.mar`` built from the tiny model."""
    from serving.archive import build_archive

    store = tmp_path_factory.mktemp("model-store")
    build_archive(tiny_model_dir, store)
    return store


@pytest.fixture
def torchserve(model_store: Path, tmp_path: Path) -> Iterator:
    """A real TorchServe on free loopback ports serving ``emotion``; always stopped."""
    from serving.server import TorchServe

    server = TorchServe(model_store, tmp_path / "ts")
    try:
        server.start(timeout=180)
    except Exception:
        print(server.log_tail())
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fixture_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the fixture splits."""
    target = tmp_path_factory.mktemp("data")
    for name in ("train.txt", "val.txt"):
        shutil.copy(FIXTURE_DATA / name, target / name)
    return target
