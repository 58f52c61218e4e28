"""What users leaving TorchServe pick instead, serving this project's engine: the peer rows of
``make bench``, and the in-process ceiling.

Every peer loads the same files as TorchServe's worker (the unpacked archive: model config,
tokenizer, the backend's exported graph) into the same ``handler/emotion_engine.EmotionEngine``,
with the archive's ``model-config.yaml``: the same backend, precision, threads and passes by
length, the same worker count, batch size and batch delay. Only the server differs.

    python -m bench.peers litserve --engine-dir DIR --port PORT    # LitServe, batching in LitAPI
    python -m bench.peers ray --engine-dir DIR --port PORT         # Ray Serve, @serve.batch

Each listens on 127.0.0.1 only, answers ``POST /predictions/emotion`` with a JSON body
``{"text": ...}`` (Ray Serve also takes text/plain) and runs until SIGTERM or SIGINT.
``ceiling`` measures the engine with the archive's batching in worker processes without any server.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import litserve
import yaml

from project import PROJECT_ROOT, handler_module

ROUTE = "/predictions/emotion"


@dataclass(frozen=True)
class ServingShape:
    """The archive's batching and worker count (``model-config.yaml``), which every peer copies."""

    workers: int
    batch_size: int
    batch_delay_s: float

    @classmethod
    def of(cls, engine_dir: Path) -> ServingShape:
        config = read_model_config(engine_dir)
        return cls(
            workers=int(config.get("minWorkers") or 1),
            batch_size=int(config.get("batchSize") or 1),
            batch_delay_s=float(config.get("maxBatchDelay") or 0) / 1000,
        )


def read_model_config(engine_dir: Path) -> dict:
    """The archive's ``model-config.yaml`` (an unpacked archive keeps it at its root)."""
    path = Path(engine_dir) / "model-config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass an unpacked archive as --engine-dir")
    return yaml.safe_load(path.read_text()) or {}


def load_engine(engine_dir: Path, threads: int | None = None):
    """The handler's engine on ``engine_dir``, warmed up; ``threads`` overrides the archive's."""
    settings_module = handler_module("emotion_settings")
    settings = settings_module.HandlerSettings.from_yaml(read_model_config(engine_dir).get("handler"))
    import torch

    if threads or settings.threads:
        torch.set_num_threads(threads or settings.threads)
    engine = handler_module("emotion_engine").EmotionEngine(Path(engine_dir), settings)
    engine.warm_up()
    return engine


def worker_threads(engine_dir: Path) -> int:
    """The engine threads a TorchServe worker runs: the archive's ``threads``, else torch's default."""
    settings = handler_module("emotion_settings").HandlerSettings.from_yaml(
        read_model_config(engine_dir).get("handler")
    )
    import torch

    return settings.threads or torch.get_num_threads()


def text_of(body: bytes, content_type: str) -> str:
    """The text of a request body: ``{"text": ...}`` JSON, or the body itself as UTF-8."""
    if "json" in content_type.lower():
        return str(json.loads(body)["text"])
    return body.decode("utf-8")


class EmotionAPI(litserve.LitAPI):
    """LitServe's side: a batch of decoded texts through the engine, one answer per text."""

    def __init__(self, engine_dir: Path, threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.engine_dir, self.threads = engine_dir, threads

    def setup(self, device) -> None:
        self.engine = load_engine(self.engine_dir, self.threads)

    def decode_request(self, request) -> str:
        return str(request["text"])

    def batch(self, inputs):
        return list(inputs)

    def predict(self, texts):
        return self.engine.predict(list(texts))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def serve_litserve(engine_dir: Path, port: int, threads: int) -> None:
    """LitServe: one inference process per TorchServe worker, LitAPI batching."""
    shape = ServingShape.of(engine_dir)
    api = EmotionAPI(
        engine_dir, threads, max_batch_size=shape.batch_size, batch_timeout=shape.batch_delay_s, api_path=ROUTE
    )
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=shape.workers, timeout=30)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning", generate_client_file=False)


def serve_ray(engine_dir: Path, port: int, threads: int, temp_dir: Path | None) -> None:
    """Ray Serve: one replica per TorchServe worker, ``@serve.batch`` batching."""
    # A loaded small machine starts the HTTP proxy actor in more than Serve's 5 s; no usage report.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    shape = ServingShape.of(engine_dir)
    # Ray sets OMP_NUM_THREADS=1 in a replica that reserves no CPU, and the ONNX backend takes its
    # thread count from torch: resolve it here, as a TorchServe worker would see it.
    threads = threads or worker_threads(engine_dir)

    @serve.deployment(num_replicas=shape.workers, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Emotion:
        def __init__(self, engine_dir: str) -> None:
            self.engine = load_engine(Path(engine_dir), threads)

        @serve.batch(max_batch_size=shape.batch_size, batch_wait_timeout_s=shape.batch_delay_s)
        async def classify(self, texts: list[str]) -> list[dict]:
            return self.engine.predict(texts)

        async def __call__(self, request) -> dict:
            return await self.classify(text_of(await request.body(), request.headers.get("content-type", "")))

    stop = _stop_flag()
    # Ray's socket paths must stay under 108 bytes: a short folder of its own under /tmp by default.
    session_dir = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        logging_level="warning",
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        },
        _temp_dir=str(session_dir),
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Emotion.bind(str(engine_dir)), route_prefix=ROUTE, blocking=False)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()
        if not temp_dir:
            shutil.rmtree(session_dir, ignore_errors=True)


def _stop_flag() -> list[int]:
    """A list that becomes non-empty on SIGTERM or SIGINT."""
    flag: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: flag.append(signum))
    return flag


def _ceiling_worker(engine_dir: str, texts: list[str], batch: int, threads: int, start_at, seconds: float, out) -> None:
    engine = load_engine(Path(engine_dir), threads)
    start_at.wait()
    done, busy, index = 0, 0.0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        chunk = [texts[(index + k) % len(texts)] for k in range(batch)]
        index += batch
        t0 = time.perf_counter()
        engine.predict(chunk)
        busy += time.perf_counter() - t0
        done += batch
    out.put((done, busy))


def ceiling(engine_dir: Path, texts: list[str], seconds: float, threads: int = 0) -> dict:
    """Texts/s of the engine in as many processes as the archive's workers, each running batches
    of the archive's ``batchSize`` back to back: what the served setup could reach with no server,
    no HTTP and full batches."""
    shape = ServingShape.of(engine_dir)
    context = multiprocessing.get_context("spawn")
    start_at, out = context.Barrier(shape.workers), context.Queue()
    processes = [
        context.Process(
            target=_ceiling_worker,
            args=(str(engine_dir), texts, shape.batch_size, threads, start_at, seconds, out),
        )
        for _ in range(shape.workers)
    ]
    for process in processes:
        process.start()
    try:
        results = [out.get(timeout=300 + seconds) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    done = sum(d for d, _ in results)
    busy = max(b for _, b in results)
    return {"requests_per_s": round(done / busy, 1), "workers": shape.workers, "batch_size": shape.batch_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=("litserve", "ray"))
    parser.add_argument("--engine-dir", type=Path, required=True, help="an unpacked model archive")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="engine threads per worker (0: the archive's)")
    parser.add_argument("--temp-dir", type=Path, help="Ray's session folder (default: a new one under /tmp)")
    args = parser.parse_args(argv)
    if args.server == "litserve":
        serve_litserve(args.engine_dir.resolve(), args.port, args.threads)
    else:
        serve_ray(args.engine_dir.resolve(), args.port, args.threads, args.temp_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
