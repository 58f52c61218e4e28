"""Helpers the tests share: fixture data, tiny training overrides, a TorchServe context for the
handler, and scripted HTTP upstreams on loopback. (Fixtures stay in ``conftest.py``.)"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from project import PROJECT_ROOT

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_DATA = FIXTURES / "emotion"
METRICS_YAML = PROJECT_ROOT / "monitoring" / "metrics.yaml"


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
    """A TorchServe worker context; ``gpu`` is the gpu_id TorchServe would hand the worker."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    yaml_config = {"batchSize": 8, "handler": handler_section or {}}
    return Context(
        "emotion", str(model_dir), {"model": {}}, 8, gpu, "0.12.0", metrics=metrics, model_yaml_config=yaml_config
    )


def run_batch(handler: Any, context: Any, requests: list[tuple]) -> list[tuple[int, dict]]:
    """Send (payload, content type[, headers]) tuples as one TorchServe batch; return (status, body)
    per request."""
    from ts.context import RequestProcessor

    context.request_processor = [
        RequestProcessor({"body": {"content-type": r[1]}, **(r[2] if len(r) > 2 else {})}) for r in requests
    ]
    context.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    context.metrics.request_ids = context.request_ids
    outputs = handler.handle([{"body": r[0]} for r in requests], context)
    assert len(outputs) == len(requests)
    return [(context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]


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
    model_store: Path, workdir: Path, models: str = "emotion=emotion.mar", timeout: float = 180, ready: tuple = ()
) -> Iterator[Any]:
    """A real TorchServe on free loopback ports, started (``emotion`` and each model of ``ready``
    with a READY worker); its log's tail printed when it cannot start; always stopped."""
    from serving.server import TorchServe

    server = TorchServe(model_store, workdir, models)
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
