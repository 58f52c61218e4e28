"""Goodput under overload through the gateway: ``python -m bench.overload [--model-store DIR]``.

Starts the stack (TorchServe behind the gateway) on free loopback ports with a short TorchServe
queue, measures its capacity with as many closed-loop clients as the queue holds (so none is
refused), then drives it with many clients that
ignore Retry-After, and reports the goodput (answers 200 per second) against the capacity, how
long the gateway took to refuse (from its access log) and the attempts per request. Prints the
CPU line first and PASS/FAIL for goodput >= ``GOODPUT_TARGET`` x capacity. Figures are the
machine's: compare the ratio, not the rates, across machines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loadtest.closed_loop import ClosedLoop
from loadtest.texts import percentile
from project import ARCHIVE_NAME, MODEL_STORE, PROJECT_ROOT, handler_module
from serving.server import free_port
from serving.settings import GatewaySettings
from serving.stack import Stack

GOODPUT_TARGET = 0.8
TEXTS = ["i feel so delighted today", "i am terrified of the dark", "i feel lonely tonight", "i am furious at him"]


def measure(model_store: Path, workdir: Path, clients: int, seconds: float, queue: int) -> dict:
    """Capacity (``queue`` clients: never more requests waiting than the queue takes), then
    ``clients`` clients for ``seconds`` s against a queue of ``queue``."""
    settings = GatewaySettings(port=free_port(), metrics_port=free_port())
    stack = Stack(
        model_store,
        workdir,
        settings,
        keys_file=workdir / "keys.json",
        free_ports=True,
        ts_overrides={"job_queue_size": str(queue)},
        drain=0.5,
    )
    url = f"{stack.url}/predictions/emotion"
    try:
        stack.start()
        stack.wait_ready(180)
        with ClosedLoop(url, stack.headers(), TEXTS, queue) as base:
            time.sleep(seconds)
        capacity = base.result.statuses.count(200) / seconds
        stack.supervise_once()
        before = (sum(stack.access_log.responses.values()), stack.access_log.attempts)
        logged_before = len(stack.gateway.log_lines())
        with ClosedLoop(url, stack.headers(), TEXTS, clients) as over:
            time.sleep(seconds)
        stack.supervise_once()
        statuses = over.result.statuses
        seen = sum(stack.access_log.responses.values()) - before[0]
        attempts = stack.access_log.attempts - before[1]
        refusals = [
            float(line.split("seconds=", 1)[1].split()[0])
            for line in stack.gateway.log_lines()[logged_before:]
            if '" 503 upstream=' in line or '" 429 upstream=' in line
        ]
    finally:
        stack.stop()
    goodput = statuses.count(200) / seconds
    return {
        "clients": clients,
        "seconds": seconds,
        "queue": queue,
        "capacity_requests_per_s": round(capacity, 1),
        "goodput_requests_per_s": round(goodput, 1),
        "goodput_share": round(goodput / capacity, 3) if capacity else 0.0,
        "refused": len(refusals),
        "refusal_p95_s": round(percentile(refusals, 95), 3) if refusals else None,
        "attempts_per_request": round(attempts / seen, 2) if seen else None,
        "statuses": {str(code): statuses.count(code) for code in sorted(set(statuses))},
    }


def archive_and_cpu(model_store: Path):
    """Stop with a clear message unless ``model_store`` holds the archive; print and return the
    CPU's capabilities (the line every benchmark starts with)."""
    if not (model_store / ARCHIVE_NAME).is_file():
        raise SystemExit(f"{model_store} has no {ARCHIVE_NAME}: make archive")
    cpu = handler_module("emotion_cpuinfo").detect()
    print(cpu.line(), flush=True)
    return cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--queue", type=int, default=8, help="TorchServe's job_queue_size")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "overload.json")
    args = parser.parse_args(argv)
    cpu = archive_and_cpu(args.model_store)
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.model_store, Path(tmp), args.clients, args.seconds, args.queue)
    row["cpu"] = cpu.summary()
    passed = row["goodput_share"] >= GOODPUT_TARGET
    print(
        f"capacity {row['capacity_requests_per_s']} req/s, goodput {row['goodput_requests_per_s']} req/s "
        f"({row['goodput_share']:.0%}) with {args.clients} clients; {row['refused']} refused "
        f"(p95 {row['refusal_p95_s']} s), {row['attempts_per_request']} attempts per request"
    )
    print(f"{'PASS' if passed else 'FAIL'}: goodput >= {GOODPUT_TARGET:.0%} of capacity under overload")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**row, "passed": passed}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
