"""``make bench``: every serving alternative measured in one run, same texts, same closed-loop client.

a. the model in-process, fp32, batched, no HTTP;
b. the seed design: FastAPI, one text per forward pass, fp32;
c. TorchServe, stock setup: batch size 1, fp32, TorchServe's default worker count;
d. TorchServe as this project configures it (handler/model-config.yaml);
e. LitServe and f. Ray Serve (``bench/peers.py``): d's engine, archive files, workers, batch size
   and batch delay, each with its own batching;
ceiling: d's engine and batching in d's worker count of processes, full batches, no server.

d is also measured with lists of 64 texts a request, and ``make predict`` (``serving.bulk``)
scores a file through the whole service (gateway and TorchServe) on d's archive: both against d.

HTTP setups are driven by wrk (compiled, light on the shared CPU) at fixed concurrency
for a fixed time after a warm-up; d, e and f get the same JSON bodies. Writes
bench/results/bench.json and bench.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import psutil
import requests
import yaml

from bench import peers
from bench.verdict import NAMES, PEERS, report
from loadtest.settings import LoadTestSettings
from loadtest.texts import latency_ms, write_texts
from project import ARCHIVE_NAME, LOOPBACK, PROJECT_ROOT, handler_module, pipeline_model_dir
from serving.archive import build_archive
from serving.process import ManagedProcess
from serving.server import TorchServe, free_port

LUA = Path(__file__).resolve().parent / "post.lua"
# Texts a request of d's list row carries (the most a request may carry).
LIST_SIZE = handler_module("emotion_inputs").MAX_TEXTS


def wrk(
    url: str,
    texts_file: Path,
    key: str | None,
    concurrency: int,
    seconds: float,
    think_ms: float = 0,
    body: str = "text",
) -> dict:
    """One wrk run; returns requests/s, percentiles and the client's CPU share.

    ``think_ms`` > 0 paces the load: each connection pauses that long on average (exponentially
    distributed) before each request. ``body``: ``text`` (text/plain), ``json`` (``{"text": ...}``)
    or ``list`` (``{"texts": [...]}``, :data:`LIST_SIZE` texts a request).
    """
    env = dict(
        os.environ,
        BENCH_TEXTS=str(texts_file),
        BENCH_AUTH=key or "",
        BENCH_THINK_MS=str(think_ms),
        BENCH_BODY=body,
        BENCH_LIST_SIZE=str(LIST_SIZE),
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "-s", str(LUA), url],
        capture_output=True,
        text=True,
        env=env,
    )
    if run.returncode != 0 or "BENCH_JSON" not in run.stdout:
        # e.g. no request finished within the run, so there are no percentiles to report
        raise RuntimeError(f"wrk failed ({run.returncode}): {(run.stderr or run.stdout)[-500:]}")
    out = run.stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = json.loads(next(line for line in out.splitlines() if line.startswith("BENCH_JSON")).split(" ", 1)[1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "requests_per_s": round(stats["requests"] / stats["seconds"], 1),
        "p50_ms": stats["p50_ms"],
        "p95_ms": stats["p95_ms"],
        "p99_ms": stats["p99_ms"],
        "errors": stats["errors"],
        "client_cpu_share": round(cpu / wall / psutil.cpu_count(), 4),
    }


def drive(url: str, texts_file: Path, key: str | None, args, body: str = "text") -> dict:
    """Warm up, then measure."""
    wrk(url, texts_file, key, args.concurrency, args.warmup, body=body)
    return wrk(url, texts_file, key, args.concurrency, args.duration, body=body)


def at_rate(url: str, texts_file: Path, key: str | None, rate: float, args, body: str = "text") -> dict:
    """Latency under a paced load of about ``rate`` requests/s (``args.concurrency`` connections).

    A connection's cycle is its pause plus the request's latency: a first run with pauses of
    ``concurrency / rate`` measures the latency, a second run subtracts it from the pause.
    """
    think = 1000 * args.concurrency / rate
    probe = wrk(url, texts_file, key, args.concurrency, args.warmup, think, body)
    latency = max(0.0, 1000 * args.concurrency / probe["requests_per_s"] - think)
    result = wrk(url, texts_file, key, args.concurrency, args.duration, max(1.0, think - latency), body)
    result["target_requests_per_s"] = round(rate, 1)
    return result


def in_process(model_dir: Path, texts: list[str], batch: int, seconds: float, warmup: float) -> dict:
    """Setup a: fp32 batches of ``batch`` texts through the model, no HTTP."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    latencies, done, index = [], 0, 0
    start = time.perf_counter()
    measuring_from = start + warmup
    while time.perf_counter() < measuring_from + seconds:
        chunk = [texts[(index + k) % len(texts)] for k in range(batch)]
        index += batch
        t0 = time.perf_counter()
        with torch.inference_mode():
            torch.softmax(model(**tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")).logits, -1)
        if t0 >= measuring_from:
            latencies.append(time.perf_counter() - t0)
            done += batch
    elapsed = sum(latencies)
    rss = psutil.Process().memory_info().rss / 2**20
    return {
        "requests_per_s": round(done / elapsed, 1),
        **latency_ms(latencies, digits=2),
        "errors": 0,
        "client_cpu_share": 0.0,
        "rss_mb_per_worker": round(rss),
    }


def worker_rss_mb(server: TorchServe) -> int:
    """Largest resident memory among the server's Python workers."""
    parent = psutil.Process(server.process.pid)
    workers = [p for p in parent.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())]
    return round(max(p.memory_info().rss for p in workers) / 2**20) if workers else 0


def fastapi_setup(model_dir: Path, texts_file: Path, args, workdir: Path) -> dict:
    """Setup b: the FastAPI baseline under uvicorn."""
    port = free_port()
    env = dict(os.environ, BENCH_MODEL_DIR=str(model_dir))
    command = [sys.executable, "-m", "uvicorn", "bench.fastapi_baseline:app", "--host", LOOPBACK, "--port", str(port)]
    url = f"http://{LOOPBACK}:{port}/predict"
    log_path = workdir / "fastapi.log"
    with ManagedProcess("FastAPI", [*command, "--log-level", "warning"], log_path, PROJECT_ROOT, env) as process:
        process.start()
        process.wait_until(lambda: answers_text(url), timeout=120, what="answering")
        result = drive(url, texts_file, None, args)
        result["rss_mb_per_worker"] = round(psutil.Process(process.pid).memory_info().rss / 2**20)
    return result


def answers_text(url: str) -> bool:
    """Whether ``url`` answers a plain-text POST with 200."""
    try:
        return requests.post(url, data=b"hello", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@contextlib.contextmanager
def torchserve_setup_server(model_dir: Path, config: dict, workdir: Path):
    """A started TorchServe serving ``model_dir`` packed with the given model-config.yaml content.

    The archive leaves the PyTorch weights out when the configured backend does not read them, as
    the CPU serving image's does. Yields ``(server, started)``: ``started`` is the
    ``perf_counter`` time just before the server start.
    """
    config = dict(config)
    default_workers = config.pop("_default_workers", None)
    overrides = {"default_workers_per_model": str(default_workers)} if default_workers else {}
    store = workdir / "store"
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "model-config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    backend = (config.get("handler") or {}).get("backend", "torch")
    reads_weights = handler_module("emotion_backends").BACKENDS[backend].reads_weights
    build_archive(model_dir, store, model_config=config_path, without_weights=not reads_weights)
    with TorchServe(store, workdir / "ts", overrides=overrides) as server:
        started = time.perf_counter()
        server.start(timeout=300)
        yield server, started


def torchserve_setup(
    model_dir: Path,
    texts_file: Path,
    config: dict,
    args,
    workdir: Path,
    half_load: bool = False,
    body: str = "text",
    lists: bool = False,
) -> dict:
    """Setups c and d: TorchServe with the given model-config.yaml content.

    ``half_load``: also measure latency at half of the measured throughput (paced load). ``lists``:
    also the same texts as lists of :data:`LIST_SIZE` a request (``result["lists"]``). The
    archive is unpacked into ``workdir/engine`` (the peers and the ceiling load it).
    """
    with torchserve_setup_server(model_dir, config, workdir) as (server, started):
        url = f"{server.inference_url}/predictions/emotion"
        first = requests.post(url, data=b"i feel fine", headers=server.headers("inference"), timeout=60)
        cold_start = time.perf_counter() - started
        assert first.status_code == 200, first.text
        result = drive(url, texts_file, server.keys.get("inference"), args, body)
        result["rss_mb_per_worker"] = worker_rss_mb(server)
        result["cold_start_s"] = round(cold_start, 1)
        if half_load:
            result["half_load"] = at_rate(
                url, texts_file, server.keys.get("inference"), result["requests_per_s"] / 2, args, body
            )
        if lists:
            # The same texts as lists of LIST_SIZE, from a few connections (each carries many texts).
            lists_args = argparse.Namespace(**{**vars(args), "concurrency": max(1, args.concurrency // 8)})
            listed = drive(url, texts_file, server.keys.get("inference"), lists_args, "list")
            listed["texts_per_s"] = round(listed["requests_per_s"] * LIST_SIZE, 1)
            listed["texts_per_request"] = LIST_SIZE
            listed["concurrency"] = lists_args.concurrency
            result["lists"] = listed
    archive = workdir / "store" / ARCHIVE_NAME
    result["archive_mb"] = round(archive.stat().st_size / 1e6, 1)
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(workdir / "engine")
    return result


def bulk_setup(store: Path, texts: list[str], d_rate: float, args, workdir: Path) -> dict:
    """``make predict`` through the gateway (the whole service, as ``make serve`` runs it) on d's
    archive: texts per second, and their ratio to d's requests per second."""
    from serving import bulk
    from serving.settings import GatewaySettings
    from serving.stack import Stack

    rows = max(8 * LIST_SIZE, round(d_rate * args.duration))
    source = workdir / "bulk.txt"
    workdir.mkdir(parents=True, exist_ok=True)
    write_texts(source, [texts[i % len(texts)] for i in range(rows)])
    settings = GatewaySettings(port=free_port(), metrics_port=free_port())
    stack = Stack(store, workdir / "stack", settings, keys_file=workdir / "keys.json", free_ports=True, drain=0.5)
    try:
        stack.start()
        stack.wait_ready(180)
        argv = ["--url", stack.url, "--key-file", str(workdir / "keys.json"), "--concurrency", "4"]
        started = time.perf_counter()
        code = bulk.main([str(source), str(workdir / "out.jsonl"), *argv])
        seconds = time.perf_counter() - started
    finally:
        stack.stop()
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "texts_per_s": round(rows / seconds, 1),
        "ratio_to_d": round(rows / seconds / d_rate, 2),
        "errors": 0 if code == 0 else 1,
    }


def answers(url: str, body: dict) -> bool:
    """Whether ``url`` answers a JSON POST with 200."""
    try:
        return requests.post(url, json=body, timeout=10).status_code == 200
    except requests.RequestException:
        return False


def peer_setup(server: str, engine_dir: Path, texts_file: Path, args, workdir: Path) -> dict:
    """Setups e and f: a peer server (``bench.peers``) on d's unpacked archive."""
    port = free_port()
    command = [sys.executable, "-m", "bench.peers", server, "--engine-dir", str(engine_dir), "--port", str(port)]
    if server == "ray":  # a session folder inside the benchmark's, removed with it
        command += ["--temp-dir", str(workdir / "ray")]
    url = f"http://127.0.0.1:{port}/predictions/emotion"
    with ManagedProcess(server, command, workdir / f"{server}.log", cwd=PROJECT_ROOT) as process:
        process.start()
        started = time.perf_counter()
        process.wait_until(lambda: answers(url, {"text": "i feel fine"}), timeout=600, what="answering")
        cold_start = time.perf_counter() - started
        result = drive(url, texts_file, None, args, body="json")
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        result["rss_mb_per_worker"] = round(max(p.memory_info().rss for p in tree) / 2**20)
        result["cold_start_s"] = round(cold_start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run all setups and print the table, ratios and target checks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=pipeline_model_dir(),
        help="model directory (default: that of the experiment in params.yaml)",
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results")
    parser.add_argument("--texts-file", type=Path, help="text;label lines (default: the load test's validation texts)")
    parser.add_argument(
        "--skip-peer", action="append", default=[], choices=sorted(PEERS.values()), help="leave a peer row out"
    )
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model_dir} is not a trained model directory: make train EXPERIMENT=<experiment>")
    print(handler_module("emotion_cpuinfo").detect().line(), flush=True)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make system-deps)")
    settings = LoadTestSettings.load()
    if args.texts_file:
        settings = dataclasses.replace(settings, texts_file=str(args.texts_file.resolve()))
    texts = settings.texts()
    tuned = yaml.safe_load((PROJECT_ROOT / "handler" / "model-config.yaml").read_text())
    stock = {
        "batchSize": 1,
        "maxBatchDelay": 100,
        "responseTimeout": 120,
        "handler": {"precision": "fp32"},
        "_default_workers": psutil.cpu_count(),
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = write_texts(Path(tmp) / "texts.txt", texts)
        print("a: in-process fp32, batched ...", flush=True)
        results["a"] = in_process(args.model_dir, texts, args.concurrency, args.duration, args.warmup)
        print("b: FastAPI baseline ...", flush=True)
        results["b"] = fastapi_setup(args.model_dir, texts_file, args, Path(tmp))
        print("c: TorchServe stock ...", flush=True)
        results["c"] = torchserve_setup(args.model_dir, texts_file, stock, args, Path(tmp) / "c")
        print("d: TorchServe tuned ...", flush=True)
        d_dir = Path(tmp) / "d"
        results["d"] = torchserve_setup(
            args.model_dir, texts_file, tuned, args, d_dir, half_load=True, body="json", lists=True
        )
        print("d: make predict through the gateway ...", flush=True)
        results["d"]["bulk"] = bulk_setup(
            d_dir / "store", texts, results["d"]["requests_per_s"], args, Path(tmp) / "bulk"
        )
        for key, server in PEERS.items():
            if server in args.skip_peer:
                continue
            print(f"{key}: {NAMES[key]} ...", flush=True)
            try:
                results[key] = peer_setup(server, d_dir / "engine", texts_file, args, Path(tmp) / key)
            except (RuntimeError, TimeoutError) as err:  # reported as a failed row and a FAIL line
                print(f"{key}: {NAMES[key]} did not run: {err}", flush=True)
                results[key] = {"failed": str(err)[-2000:]}
        print("ceiling: d's engine and batching, no server ...", flush=True)
        results["ceiling"] = peers.ceiling(d_dir / "engine", texts, args.duration)
    return report(results, tuned, args)


if __name__ == "__main__":
    raise SystemExit(main())
