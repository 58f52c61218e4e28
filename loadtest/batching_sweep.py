"""Measure TorchServe's dynamic batching: batch size x max delay x workers -> throughput and p95.

``python -m loadtest.batching_sweep`` starts one private TorchServe, registers the
archive once per setting (``batch_size``, ``max_batch_delay``, ``initial_workers``
on the management API), drives it with the same closed-loop client for a fixed
time after a warm-up, and writes ``loadtest/results/batching.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from loadtest.closed_loop import ClosedLoop
from loadtest.settings import LoadTestSettings
from loadtest.texts import latency_ms
from project import ARCHIVE_NAME, MODEL_NAME, MODEL_STORE, PROJECT_ROOT
from serving.server import TorchServe


def measure(server: TorchServe, texts: list[str], concurrency: int, warmup: float, duration: float) -> dict:
    """Throughput and latency percentiles of a closed loop, warm-up excluded."""
    url = f"{server.inference_url}/predictions/emotion"
    with ClosedLoop(url, server.headers("inference"), texts, concurrency) as client:
        time.sleep(warmup)
        start_count = len(client.result.statuses)
        started = time.perf_counter()
        time.sleep(duration)
        elapsed = time.perf_counter() - started
        window = client.result.latencies[start_count:]
    failed = client.result.failed
    return {
        "requests_per_s": round(len(window) / elapsed, 1),
        **latency_ms(window),
        "failed": failed,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the grid and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="load-test config whose texts_file to use")
    parser.add_argument("--store", type=Path, default=MODEL_STORE)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--delays", default="5,20")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=4)
    parser.add_argument("--duration", type=float, default=12)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "loadtest" / "results" / "batching.json")
    args = parser.parse_args(argv)
    if not (args.store / ARCHIVE_NAME).is_file():
        raise SystemExit(f"no {args.store / ARCHIVE_NAME}: run `make archive` first")
    texts = LoadTestSettings.load(args.config).texts()
    grid = itertools.product(
        [int(v) for v in args.batch_sizes.split(",")],
        [int(v) for v in args.delays.split(",")],
        [int(v) for v in args.workers.split(",")],
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, TorchServe(args.store, Path(tmp), models=None) as server:
        server.start(wait_model=None)
        for batch_size, delay, workers in grid:
            server.client.register(
                ARCHIVE_NAME,
                batch_size=batch_size,
                max_batch_delay=delay,
                initial_workers=workers,
                synchronous="true",
            )
            row = {
                "batch_size": batch_size,
                "max_batch_delay_ms": delay,
                "workers": workers,
                **measure(server, texts, args.concurrency, args.warmup, args.duration),
            }
            rows.append(row)
            print(row, flush=True)
            server.client.unregister(MODEL_NAME)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"concurrency": args.concurrency, "duration_s": args.duration, "rows": rows}, indent=2) + "\n"
    )
    print("\n| batchSize | maxBatchDelay (ms) | workers | requests/s | p50 (ms) | p95 (ms) | failed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['max_batch_delay_ms']} | {r['workers']} | {r['requests_per_s']} "
            f"| {r['p50_ms']} | {r['p95_ms']} | {r['failed']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
