"""Predictions under a feedback flood: ``python -m bench.feedback_flood [--model-store DIR]``.

Starts the service as ``make serve`` runs it (``python -m serving run``, its own process, on free
loopback ports), measures its prediction capacity with closed-loop clients, then paces
predictions at ``--load`` (default half) of that capacity, open loop, through alternating
phases: quiet, then flooded, for ``--rounds`` rounds. In a flooded phase wrk posts lists of 1,000
labels to ``/feedback`` back to back from ``--flooders`` connections (labels of served answers,
unknown ids and bad labels mixed); past the gateway's feedback rate they are refused with 429.
It reports the prediction p50/p99 of the quiet and the flooded phases, their ratio, and what the
flood got. PASS when the flooded p99 is within ``P99_TARGET`` of the quiet one.

The flood's wrk runs at the lowest CPU priority (it stands for clients on other machines); the
paced prediction clients run in this process, the service in its own, and on a machine with few
cores all of them share the cores: compare the ratio, not the milliseconds, across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.overload import archive_and_cpu
from loadtest.closed_loop import ClosedLoop
from loadtest.texts import percentile
from project import LOOPBACK, MODEL_NAME, MODEL_STORE, PROJECT_ROOT
from serving import keys as gateway_keys
from serving.feedback import MAX_ITEMS
from serving.process import ManagedProcess
from serving.server import free_port

FLOOD_LUA = Path(__file__).with_name("feedback_flood.lua")
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
                text, headers = TEXTS[k % len(TEXTS)].encode(), self.headers | {"X-Request-ID": rid}
                status = session.post(self.url, data=text, timeout=60, headers=headers).status_code
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


def phase_summary(samples: list[tuple[str, int, float]], phase: str) -> dict:
    """Requests, failures and the p50/p99 of the answered ones, of one phase of a :class:`PacedLoad`."""
    latencies = [s for p, status, s in samples if p == phase and status == 200]
    return {
        "requests": sum(p == phase for p, _, _ in samples),
        "failed": sum(p == phase and status != 200 for p, status, _ in samples),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
    }


def flood_body(served: list[str], rng: random.Random) -> bytes:
    """A list of ``MAX_ITEMS`` labels: 80% for served answers (stored once, then duplicates or
    conflicts), 10% for ids never served, 10% with a label outside the six."""
    items = []
    for n in range(MAX_ITEMS):
        kind = n % 10
        rid = rng.choice(served) if kind < 8 else f"never-{rng.getrandbits(40):x}"
        items.append({"request_id": rid, "label": rng.choice(LABELS) if kind != 9 else "happiness"})
    return json.dumps(items).encode()


def flood(url: str, key: str, body: Path, seconds: float, clients: int) -> dict:
    """wrk posting ``body`` to ``url`` from ``clients`` connections for ``seconds`` s, at the lowest
    CPU priority: the flood's clients stand for machines elsewhere, so the cost measured is the
    service's (nginx, the feedback service), not the load generator's."""
    command = ["nice", "-n", "19", "wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    command += ["-s", str(FLOOD_LUA), url]
    env = {**os.environ, "FLOOD_BODY": str(body), "FLOOD_AUTH": key}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((x for x in run.stdout.splitlines() if x.startswith("FLOOD_JSON ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({run.returncode}): {(run.stderr or run.stdout)[-500:]}")
    return json.loads(line.split(" ", 1)[1])


def labelled(database: Path) -> int:
    """Labels the feedback store holds."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]


def start_service(model_store: Path, workdir: Path, *flags: str) -> tuple[ManagedProcess, str, dict[str, str]]:
    """``python -m serving run`` on free loopback ports; (process, gateway URL, auth header) once ready."""
    port = free_port()
    command = [sys.executable, "-m", "serving", "run", "--workdir", str(workdir), "--model-store", str(model_store)]
    command += ["--ts-free-ports", "--port", str(port), "--metrics-port", str(free_port()), "--drain", "0.5", *flags]
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


def measure(
    model_store: Path, workdir: Path, seconds: float, rounds: int, load: float, flooders: int, *flags: str
) -> dict:
    process, url, headers = start_service(model_store, workdir, *flags)
    predictions = f"{url}/predictions/{MODEL_NAME}"
    try:
        with ClosedLoop(predictions, headers, TEXTS, 4) as base:
            time.sleep(seconds)
        capacity = base.result.statuses.count(200) / seconds
        key = headers["Authorization"].split()[-1]
        body = workdir / "flood.json"
        floods = []
        with PacedLoad(predictions, headers, capacity * load) as paced:
            for _ in range(rounds):
                paced.phase = "quiet"
                time.sleep(seconds)
                body.write_bytes(flood_body(list(paced.served[-5000:]) or ["none"], random.Random(len(floods))))
                paced.phase = "flood"
                floods.append(flood(f"{url}/feedback", key, body, seconds, flooders))
        stored = labelled(workdir / "feedback.sqlite")
        row: dict = {"capacity_requests_per_s": round(capacity, 1), "paced_requests_per_s": round(capacity * load, 1)}
        for phase in ("quiet", "flood"):
            row[phase] = phase_summary(paced.samples, phase)
        row["p99_ratio"] = round(row["flood"]["p99_ms"] / row["quiet"]["p99_ms"], 3)
        sent = sum(f["requests"] for f in floods)
        refused = sum(f["non_2xx"] for f in floods)
        flood_seconds = sum(f["seconds"] for f in floods)
        row["feedback"] = {
            "requests_per_s": round(sent / flood_seconds, 1),
            "refused_per_s": round(refused / flood_seconds, 1),
            "items_answered_per_s": round((sent - refused) * MAX_ITEMS / flood_seconds, 1),
            "labels_stored": stored,
            "connection_errors": sum(f["errors"] for f in floods),
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
    parser.add_argument("--flooders", type=int, default=4, help="feedback connections")
    parser.add_argument("--service-flag", action="append", default=[], help="a flag for `python -m serving run`")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "feedback_flood.json")
    args = parser.parse_args(argv)
    cpu = archive_and_cpu(args.model_store)
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(
            args.model_store.resolve(),
            Path(tmp),
            args.seconds,
            args.rounds,
            args.load,
            args.flooders,
            *args.service_flag,
        )
    row["cpu"] = cpu.summary()
    row["passed"] = row["p99_ratio"] <= P99_TARGET
    print(f"capacity {row['capacity_requests_per_s']} req/s; paced {row['paced_requests_per_s']} req/s")
    for phase in ("quiet", "flood"):
        p = row[phase]
        print(f"{phase}: p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms ({p['requests']} requests, {p['failed']} failed)")
    print(f"feedback: {row['feedback']}")
    verdict = "PASS" if row["passed"] else "FAIL"
    print(f"{verdict}: flooded p99 / quiet p99 = {row['p99_ratio']} (target <= {P99_TARGET})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
