"""Predictions under a feedback flood: ``python -m bench.feedback_flood [--model-store DIR]``.

Starts the service as ``make serve`` runs it (``python -m serving run``, its own process, on free
loopback ports), measures its prediction capacity with closed-loop clients, then paces
predictions at ``--load`` (default half) of that capacity, open loop, through alternating
phases: quiet, then with ``--flooders`` clients posting lists of 1,000 labels to ``/feedback`` as
fast as they are answered (valid labels of served answers, unknown ids and bad labels mixed), and
so on for ``--rounds`` rounds. It reports the prediction p50/p99 of the quiet and the flooded
phases, their ratio, and what the flood got (statuses, labels stored per second). PASS when the
flooded p99 is within ``P99_TARGET`` of the quiet one. The load generator runs in this process,
the service in another; on a machine with few cores they share them, as they would in
production with a sidecar: compare the ratio, not the milliseconds, across machines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
import sys
import threading
import time
from pathlib import Path

import requests

from loadtest.closed_loop import ClosedLoop
from loadtest.texts import percentile
from project import ARCHIVE_NAME, LOOPBACK, MODEL_NAME, MODEL_STORE, PROJECT_ROOT, handler_module
from serving import keys as gateway_keys
from serving.feedback import MAX_ITEMS
from serving.process import ManagedProcess
from serving.server import free_port

P99_TARGET = 1.10  # flooded p99 / quiet p99
TEXTS = ["i feel so delighted today", "i am terrified of the dark", "i feel lonely tonight", "i am furious at him"]
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


class PacedLoad:
    """Predictions at ``rate`` per second, open loop: request k is due at ``k / rate`` s whether or
    not the earlier ones were answered (``threads`` senders take the due ones in turn), so a slower
    server shows as latency, not as fewer requests. Keeps each answer's latency and phase."""

    def __init__(self, url: str, headers: dict[str, str], rate: float, threads: int = 16) -> None:
        self.url, self.rate = url, rate
        self.headers = {"Content-Type": "text/plain", **headers}
        self.phase = "quiet"
        self.samples: list[tuple[str, int, float]] = []  # (phase, status, seconds)
        self.served: list[str] = []  # request ids answered 200
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]

    def _send(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            with self._lock:
                k = next(self._next)
            delay = self._start + k / self.rate - time.perf_counter()
            if delay > 0 and self._stop.wait(delay):
                return
            phase, began = self.phase, time.perf_counter()
            rid = f"paced-{k}"
            try:
                status = session.post(
                    self.url, data=TEXTS[k % len(TEXTS)].encode(), timeout=60, headers=self.headers | {"X-Request-ID": rid}
                ).status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.samples.append((phase, status, time.perf_counter() - began))
                if status == 200:
                    self.served.append(rid)

    def __enter__(self) -> PacedLoad:
        self._start = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


class FeedbackFlood:
    """``clients`` threads posting lists of ``MAX_ITEMS`` labels to ``url`` back to back while
    :attr:`on` is set: labels of served answers (``served()``), unknown ids and bad labels."""

    def __init__(self, url: str, headers: dict[str, str], served, clients: int) -> None:
        self.url, self.headers, self.served = url, headers, served
        self.on = threading.Event()
        self.statuses: list[int] = []
        self.stored = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._flood, args=(i,), daemon=True) for i in range(clients)]

    def _items(self, rng: random.Random) -> list[dict]:
        ids = self.served()
        items = []
        for n in range(MAX_ITEMS):
            kind = n % 10
            rid = rng.choice(ids) if ids and kind < 8 else f"never-{rng.getrandbits(40):x}"
            items.append({"request_id": rid, "label": rng.choice(LABELS) if kind != 9 else "happiness"})
        return items

    def _flood(self, seed: int) -> None:
        rng, session = random.Random(seed), requests.Session()
        while not self._stop.is_set():
            if not self.on.wait(0.1):
                continue
            try:
                answer = session.post(self.url, json=self._items(rng), headers=self.headers, timeout=60)
                status = answer.status_code
                stored = answer.json().get("counts", {}).get("accepted", 0) if status == 200 else 0
            except (requests.RequestException, ValueError):
                status, stored = 0, 0
            with self._lock:
                self.statuses.append(status)
                self.stored += stored

    def __enter__(self) -> FeedbackFlood:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.on.clear()
        for thread in self._threads:
            thread.join(timeout=90)


def start_service(model_store: Path, workdir: Path) -> tuple[ManagedProcess, str, dict[str, str]]:
    """``python -m serving run`` on free loopback ports; (process, gateway URL, auth header) once ready."""
    port = free_port()
    command = [sys.executable, "-m", "serving", "run", "--workdir", str(workdir), "--model-store", str(model_store)]
    command += ["--ts-free-ports", "--port", str(port), "--metrics-port", str(free_port()), "--drain", "0.5"]
    process = ManagedProcess("the service", command, workdir / "service.log", cwd=PROJECT_ROOT)
    process.start()
    url = f"http://{LOOPBACK}:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        process.wait_until(ready, 240, "ready")
    except (RuntimeError, TimeoutError):
        process.stop()
        raise
    key = gateway_keys.valid_keys(workdir / "keys.json")[0]
    return process, url, {"Authorization": f"Bearer {key}"}


def measure(model_store: Path, workdir: Path, seconds: float, rounds: int, load: float, flooders: int) -> dict:
    process, url, headers = start_service(model_store, workdir)
    predictions = f"{url}/predictions/{MODEL_NAME}"
    try:
        with ClosedLoop(predictions, headers, TEXTS, 4) as base:
            time.sleep(seconds)
        capacity = base.result.statuses.count(200) / seconds
        with PacedLoad(predictions, headers, capacity * load) as paced:
            with FeedbackFlood(f"{url}/feedback", headers, lambda: list(paced.served[-5000:]), flooders) as flood:
                for _ in range(rounds):
                    for phase in ("quiet", "flood"):
                        paced.phase = phase
                        (flood.on.set if phase == "flood" else flood.on.clear)()
                        time.sleep(seconds)
        row: dict = {"capacity_requests_per_s": round(capacity, 1), "paced_requests_per_s": round(capacity * load, 1)}
        for phase in ("quiet", "flood"):
            latencies = [s for p, status, s in paced.samples if p == phase and status == 200]
            row[phase] = {
                "requests": sum(p == phase for p, _, _ in paced.samples),
                "failed": sum(p == phase and status != 200 for p, status, _ in paced.samples),
                "p50_ms": round(1000 * percentile(latencies, 50), 1),
                "p99_ms": round(1000 * percentile(latencies, 99), 1),
            }
        row["p99_ratio"] = round(row["flood"]["p99_ms"] / row["quiet"]["p99_ms"], 3)
        flood_seconds = seconds * rounds
        row["feedback"] = {
            "requests": len(flood.statuses),
            "statuses": {str(c): flood.statuses.count(c) for c in sorted(set(flood.statuses))},
            "labels_stored_per_s": round(flood.stored / flood_seconds, 1),
            "items_answered_per_s": round(flood.statuses.count(200) * MAX_ITEMS / flood_seconds, 1),
        }
    finally:
        process.stop()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--seconds", type=float, default=15, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="quiet + flood rounds")
    parser.add_argument("--load", type=float, default=0.5, help="paced predictions, share of capacity")
    parser.add_argument("--flooders", type=int, default=4, help="feedback clients")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "feedback_flood.json")
    args = parser.parse_args(argv)
    if not (args.model_store / ARCHIVE_NAME).is_file():
        raise SystemExit(f"{args.model_store} has no {ARCHIVE_NAME}: make archive")
    cpu = handler_module("emotion_cpuinfo").detect()
    print(cpu.line(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(args.model_store.resolve(), Path(tmp), args.seconds, args.rounds, args.load, args.flooders)
    row["cpu"] = cpu.summary()
    row["passed"] = row["p99_ratio"] <= P99_TARGET
    quiet, flood = row["quiet"], row["flood"]
    print(
        f"capacity {row['capacity_requests_per_s']} req/s; paced {row['paced_requests_per_s']} req/s\n"
        f"quiet: p50 {quiet['p50_ms']} ms, p99 {quiet['p99_ms']} ms ({quiet['requests']} requests, {quiet['failed']} failed)\n"
        f"flood: p50 {flood['p50_ms']} ms, p99 {flood['p99_ms']} ms ({flood['requests']} requests, {flood['failed']} failed)\n"
        f"feedback: {row['feedback']}"
    )
    print(f"{'PASS' if row['passed'] else 'FAIL'}: flooded p99 / quiet p99 = {row['p99_ratio']} (target <= {P99_TARGET})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
