"""The feedback service: ``POST /feedback`` and the live quality metrics, in a process of its own.

``python -m serving.feedback_service --db F --log-dir D --labels '["sadness", ...]' --port P``
serves, on loopback only:

* ``POST /feedback``: labels into the :class:`~serving.feedback.FeedbackStore` (behind the
  gateway, which checks the client key and the feedback rate first);
* ``GET /metrics``: the live quality in Prometheus' text format, which the stack's supervisor
  appends to the gateway's metrics;
* ``GET /live``: 200 once the store is open.

It reads the handler's request log once a second for the answers served, and runs as background
work (:func:`lower_priority`: ``SCHED_IDLE``, nice 19): a flood of labels yields the CPU to the
model's workers and the gateway instead of taking its share of it, and it shares no interpreter
lock with the supervisor. The supervisor
starts it (:class:`FeedbackProcess`), restarts it if it exits, and stops it with the stack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from project import LOOPBACK
from serving.feedback import (
    ERRORS,
    ITEMS_PER_S,
    MAX_BODY_BYTES,
    MAX_ITEMS,
    QUALITY_WINDOW,
    RETENTION_DAYS,
    FeedbackStore,
)
from serving.process import ManagedProcess

log = logging.getLogger("serving.feedback")

NICENESS = 19  # the lowest CPU priority: feedback is background work
INGEST_INTERVAL = 1.0  # seconds between reads of the request log


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


class Pacer:
    """At most ``rate`` items per second, on average: :meth:`take` returns how long to wait before
    handling ``n`` more (0: at once). Unused budget does not pile up beyond one second's worth."""

    def __init__(self, rate: float, clock=time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"items per second must be > 0, not {rate}")
        self.rate, self.clock = rate, clock
        self.ready = clock()  # when the next item may start

    def take(self, n: int) -> float:
        now = self.clock()
        start = max(self.ready, now - 1.0)
        self.ready = start + n / self.rate
        return max(0.0, start - now)


class JSONHandler(BaseHTTPRequestHandler):
    """A loopback service's request handler: JSON answers, no access log of its own (the gateway
    in front keeps one). The feedback and explanation services answer through it."""

    def send_json(self, status: int, body: dict) -> None:
        payload = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


class FeedbackServer:
    """``POST /feedback``, ``GET /metrics`` and ``GET /live`` over a :class:`FeedbackStore`, on a
    loopback port, in threads of the calling process. Bodies are handled one at a time, paced to
    ``items_per_s`` labels per second (a request waits its turn, it is not refused)."""

    def __init__(
        self, store: FeedbackStore, port: int = 0, host: str = LOOPBACK, items_per_s: float = ITEMS_PER_S
    ) -> None:
        self.store = store
        self.serial = threading.Lock()
        self.pacer = Pacer(items_per_s)
        outer = self

        class Handler(JSONHandler):
            def do_POST(self) -> None:
                if self.path != "/feedback":
                    return self.send_json(404, ERRORS.error_body("NotFound", "POST /feedback"))
                body = self._body()
                # One body at a time: the store serialises the work anyway, and threads taking
                # turns at the interpreter lock would wake each other (and the CPU) for nothing.
                with outer.serial:
                    status, answer = outer.handle_post(body, self.headers.get("X-Request-ID"))
                self.send_json(status, answer)

            def do_GET(self) -> None:
                if self.path == "/live":
                    return self.send_json(200, {"status": "live"})
                if self.path != "/metrics":
                    return self.send_json(404, ERRORS.error_body("NotFound", "GET /metrics or /live"))
                payload = outer.store.metrics().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes | None:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    return None
                return self.rfile.read(length) if 0 <= length <= MAX_BODY_BYTES else None

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def handle_post(self, raw: bytes | None, request_id: str | None) -> tuple[int, dict]:
        """The status and JSON body for one ``POST /feedback`` body."""

        def error(kind: str, message: str) -> tuple[int, dict]:
            body = ERRORS.error_body(kind, message) | {"request_id": request_id}
            return body["code"], body

        if raw is None:
            return error("BodyTooLarge", f"send at most {MAX_BODY_BYTES} bytes with a Content-Length")
        try:
            payload = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # not UTF-8 or not JSON; NaN/Infinity; nested too deep
            return error("MalformedJSON", 'send {"request_id": ..., "label": ...} or a list of them')
        if isinstance(payload, list):
            if not payload or len(payload) > MAX_ITEMS:
                return error("InvalidFeedback", f"send 1 to {MAX_ITEMS} items in a list, not {len(payload)}")
            time.sleep(self.pacer.take(len(payload)))
            outcomes = self.store.submit(payload)
            counts: dict[str, int] = {}
            for o in outcomes:
                counts[o.result] = counts.get(o.result, 0) + 1
            return 200, {"results": [o.to_json() for o in outcomes], "counts": counts}
        time.sleep(self.pacer.take(1))
        (outcome,) = self.store.submit([payload])
        return outcome.status, outcome.to_json()

    def start(self) -> FeedbackServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="feedback", daemon=True)
        self._thread.start()
        log.info("feedback service on %s:%d, store %s", LOOPBACK, self.port, self.store.path)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.close()


def lower_priority(niceness: int = NICENESS) -> None:
    """Run this process as background work: every thread it has (Linux keeps the priority per
    thread, and the imports have started some, e.g. BLAS's) and, by inheritance, every thread it
    starts, at ``niceness`` and, where the kernel has it, in the ``SCHED_IDLE`` class, which any
    other thread that wakes preempts at once (nice alone let a busy feedback thread delay a model
    worker by a time slice: p99 +22% under a flood, against +6% with ``SCHED_IDLE``,
    ``bench.feedback_flood``). Under a saturated CPU feedback then waits, predictions do not.
    Where the kernel schedules processes in groups by session (autogroup), nice counts only
    inside a group, so the group's own nice value is set too."""
    tasks = Path("/proc/self/task")
    for tid in [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, max(niceness, os.getpriority(os.PRIO_PROCESS, tid)))
            if hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    with contextlib.suppress(OSError):  # no autogroup: nice alone orders processes
        Path("/proc/self/autogroup").write_text(str(niceness))


class FeedbackProcess:
    """The supervisor's handle on ``python -m serving.feedback_service``: start, metrics, stop.

    Args:
        db: The SQLite store.
        labels: The label names, in the model's order.
        log_dir: The handler's request-log folder.
        port: The loopback port (the gateway forwards ``/feedback`` to it).
        log_path: Where the process's output goes.
        retention_days: Days an answer may get its label.
        window: Labelled answers per version the quality metrics cover.
        items_per_s: Labels handled per second at most (a flood waits its turn).
    """

    def __init__(
        self,
        db: Path,
        labels: Sequence[str],
        log_dir: Path,
        port: int,
        log_path: Path,
        retention_days: float = RETENTION_DAYS,
        window: int = QUALITY_WINDOW,
        items_per_s: float = ITEMS_PER_S,
    ) -> None:
        self.url = f"http://{LOOPBACK}:{port}"
        command = [sys.executable, "-m", "serving.feedback_service", "--db", str(db), "--log-dir", str(log_dir)]
        command += ["--labels", json.dumps(list(labels)), "--port", str(port)]
        command += ["--retention-days", str(retention_days), "--window", str(window)]
        command += ["--items-per-s", str(items_per_s)]
        self.process = ManagedProcess("the feedback service", command, log_path)
        self.latest = ""  # the last metrics the service gave (see :meth:`metrics`)
        self._polling = threading.Event()
        self._poller: threading.Thread | None = None

    def start(self, timeout: float | None = 60) -> None:
        """Start the process; returns once ``/live`` answers, or at once with ``timeout`` None (a
        restart by the supervisor, whose health checks must not wait for it)."""
        self.process.start()

        def live() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{self.url}/live", timeout=1).status_code == 200
            return False

        if timeout is not None:
            self.process.wait_until(live, timeout, "live")
        if self._poller is None:
            self._polling.set()
            self._poller = threading.Thread(target=self._poll, name="feedback-metrics", daemon=True)
            self._poller.start()

    def fetch(self) -> str:
        """The live quality metrics now; empty (and a warning) when the service does not answer."""
        try:
            answer = requests.get(f"{self.url}/metrics", timeout=5)
            answer.raise_for_status()
            return answer.text
        except requests.RequestException as err:
            log.warning("no live quality metrics this round: %s", err)
            return ""

    def _poll(self) -> None:
        # Fetched beside the supervisor, not by it: a service that yields the CPU to the model may
        # answer slowly on a saturated machine, and the supervisor's health checks must not wait.
        while self._polling.is_set():
            text = self.fetch()
            if text or not self.process.running():
                self.latest = text
            time.sleep(INGEST_INTERVAL)

    def metrics(self) -> str:
        """The last live quality metrics fetched (about once a second); empty before the first."""
        return self.latest

    def stop(self) -> None:
        self._polling.clear()
        if self._poller is not None:
            self._poller.join(timeout=10)
            self._poller = None
        self.process.stop(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="the SQLite store")
    parser.add_argument("--log-dir", type=Path, required=True, help="the handler's request-log folder")
    parser.add_argument("--labels", type=json.loads, required=True, help="JSON list of the label names")
    parser.add_argument("--port", type=int, required=True, help="loopback port")
    parser.add_argument("--retention-days", type=float, default=RETENTION_DAYS)
    parser.add_argument("--window", type=int, default=QUALITY_WINDOW)
    parser.add_argument("--items-per-s", type=float, default=ITEMS_PER_S, help="labels handled per second at most")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lower_priority()
    store = FeedbackStore(args.db, args.labels, args.log_dir, args.retention_days, args.window)
    server = FeedbackServer(store, args.port, items_per_s=args.items_per_s).start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        while not stopping.wait(INGEST_INTERVAL):
            try:
                store.ingest()  # the answers served since the last round, before the log rotates
            except Exception:  # one bad round must not end the service; the next one tries again
                log.exception("reading the request log failed")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
