"""Delayed ground truth: ``POST /feedback`` joined to the answers served, and live quality metrics.

A client that learns the true label of a text it sent (a user's correction, a reviewer's verdict,
an outcome days later) posts it with the answer's ``request_id``::

    POST /feedback  {"request_id": "6f1c...", "label": "joy"}
    POST /feedback  [{"request_id": "...", "label": "joy"}, ...]        (at most MAX_ITEMS)

The gateway authenticates it with the client key and limits it on its own rate zone, then hands it
to :class:`FeedbackServer`, a thread of the stack's supervisor: no prediction waits on it.

:class:`FeedbackStore` keeps, in SQLite (one file, WAL journal, every write committed before the
answer), the served answers it reads from the handler's request log (``request_id``, time, model
version, served probabilities; never a text or a key) and the labels sent for them. Each item gets
its own outcome:

=======  ==========================================================================
200      ``accepted``: the label is stored; ``duplicate``: the same label again (no change)
400      the item is not ``{"request_id": <id>, "label": <one of the six>}``
404      no answer with that id was served (or it is older than twice the retention)
409      the id already has another label: **the first label wins** and is kept
410      the answer is older than the retention window (default 7 days)
=======  ==========================================================================

A single item is answered with its own status and ``{"status", "result", "request_id"[, "message"]}``
(the id the label is for); a list with 200, ``results`` (one outcome per item, in order) and
``counts`` by result. The feedback request's own id is in its ``X-Request-ID`` header.

:meth:`FeedbackStore.metrics` (Prometheus' text format; the supervisor appends it to the
gateway's ``/metrics``, which Prometheus scrapes already) reports, per model version, over the
last ``window`` labelled answers: how many, accuracy, per-class precision, recall and F1 (a class
with no label, or never predicted, is absent, not 0), confusion counts, expected calibration error
(10 bins) and Brier score (``monitoring.quality``), plus a histogram of the delay between an answer
and its label and counters of outcomes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.quality import quality
from project import LOOPBACK, handler_module

log = logging.getLogger("serving.feedback")

MAX_ITEMS = 1000
MAX_BODY_BYTES = 1 << 20
RETENTION_DAYS = 7.0
QUALITY_WINDOW = 1000
FEEDBACK_NICENESS = 19  # the feedback service's threads run at the lowest CPU priority
# Label delay buckets, seconds: a minute to a week.
DELAY_BUCKETS = (60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400)
REQUEST_ID = handler_module("emotion_inputs").REQUEST_ID
ERRORS = handler_module("emotion_errors")

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    request_id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    model_version TEXT NOT NULL,
    probabilities TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT PRIMARY KEY REFERENCES answers(request_id),
    label TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_by_time ON labels(time);
CREATE INDEX IF NOT EXISTS answers_by_time ON answers(time);
CREATE TABLE IF NOT EXISTS log_position (
    inode INTEGER PRIMARY KEY,
    offset INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Outcome:
    """What became of one feedback item."""

    status: int
    result: str
    request_id: Any = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        body = {"status": self.status, "result": self.result, "request_id": self.request_id}
        return body | ({"message": self.message} if self.message else {})


class FeedbackStore:
    """The served answers and their labels, in SQLite at ``path``.

    Args:
        path: The database file (created with its folder).
        labels: The label names, in the model's order.
        log_dir: The handler's request-log folder, read for the served answers.
        retention_days: Labels are taken for answers up to this old (410 beyond); answers older
            than twice this are dropped from the store.
        window: Labelled answers per model version the quality metrics cover.
        clock: Unix seconds (tests pass their own).
    """

    def __init__(
        self,
        path: Path,
        labels: Sequence[str],
        log_dir: Path,
        retention_days: float = RETENTION_DAYS,
        window: int = QUALITY_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if retention_days <= 0 or window < 1:
            raise ValueError(f"retention_days must be > 0 and window >= 1, not {retention_days} and {window}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.labels = list(labels)
        self.log_dir = Path(log_dir)
        self.retention_s = 86400 * retention_days
        self.window = window
        self.clock = clock
        self.outcomes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._monitor = handler_module("emotion_monitor")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def ingest(self) -> int:
        """Store the answers the request log gained since the last call; returns how many.

        Each file is read from where the last call stopped (by inode, so a rotated file is not read
        again); lines without a request id or probabilities, and ids already stored (a retried
        attempt answered twice), are skipped. Answers past twice the retention are dropped.
        """
        added = 0
        now = self.clock()
        with self._transaction() as db:
            positions = dict(db.execute("SELECT inode, offset FROM log_position"))
            seen = set()
            for path in self._monitor.request_log_files(self.log_dir):
                try:
                    with path.open("rb") as handle:
                        inode = os.fstat(handle.fileno()).st_ino
                        seen.add(inode)
                        handle.seek(positions.get(inode, 0))
                        chunk = handle.read()
                except OSError:
                    continue
                complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
                rows = [row for line in complete.splitlines() if (row := self._answer_row(line)) is not None]
                cursor = db.executemany("INSERT OR IGNORE INTO answers VALUES (?, ?, ?, ?)", rows)
                added += max(cursor.rowcount, 0)
                db.execute(
                    "INSERT OR REPLACE INTO log_position VALUES (?, ?)",
                    (inode, positions.get(inode, 0) + len(complete)),
                )
            for inode in set(positions) - seen:  # files rotated away for good
                db.execute("DELETE FROM log_position WHERE inode = ?", (inode,))
            db.execute(
                "DELETE FROM labels WHERE request_id IN (SELECT request_id FROM answers WHERE time < ?)",
                (now - 2 * self.retention_s,),
            )
            db.execute("DELETE FROM answers WHERE time < ?", (now - 2 * self.retention_s,))
        return added

    def _answer_row(self, line: bytes) -> tuple | None:
        try:
            entry = json.loads(line)
            probabilities = entry["probabilities"]
            row = [float(probabilities[name]) for name in self.labels]
            rid, when = entry["request_id"], float(entry["time"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid) or not all(np.isfinite(row)):
            return None
        return rid, when, str(entry.get("model_version") or "unknown"), json.dumps(row)

    def submit(self, items: Sequence[Any]) -> list[Outcome]:
        """Store the labels of ``items``, each ``{"request_id": ..., "label": ...}``; one outcome each
        (module docstring). Ids the store does not know yet are looked for in the request log first."""
        checked = [self._check(item) for item in items]
        if any(isinstance(c, tuple) and not self._known(c[0]) for c in checked):
            self.ingest()
        now = self.clock()
        outcomes = []
        with self._transaction() as db:
            for item in checked:
                outcomes.append(item if isinstance(item, Outcome) else self._store(db, *item, now))
        for outcome in outcomes:
            self.outcomes[outcome.result] = self.outcomes.get(outcome.result, 0) + 1
        return outcomes

    def _check(self, item: Any) -> Outcome | tuple[str, str]:
        if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
            return Outcome(400, "invalid", None, 'an item is {"request_id": "<id of an answer>", "label": "<label>"}')
        rid, label = item["request_id"], item["label"]
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
            return Outcome(400, "invalid", None, "request_id must be 1 to 64 of [A-Za-z0-9._-]")
        if label not in self.labels:
            return Outcome(400, "invalid", rid, f"label must be one of {self.labels}")
        return rid, label

    def _known(self, rid: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM answers WHERE request_id = ?", (rid,)).fetchone() is not None

    def _store(self, db: sqlite3.Connection, rid: str, label: str, now: float) -> Outcome:
        answer = db.execute("SELECT time FROM answers WHERE request_id = ?", (rid,)).fetchone()
        if answer is None:
            return Outcome(404, "unknown", rid, "no answer with this request_id was served")
        if now - answer[0] > self.retention_s:
            return Outcome(410, "expired", rid, f"the answer is older than {self.retention_s / 86400:g} days")
        previous = db.execute("SELECT label FROM labels WHERE request_id = ?", (rid,)).fetchone()
        if previous is None:
            db.execute("INSERT INTO labels VALUES (?, ?, ?)", (rid, label, now))
            return Outcome(200, "accepted", rid)
        if previous[0] == label:
            return Outcome(200, "duplicate", rid)
        return Outcome(409, "conflict", rid, f"already labelled {previous[0]!r}: the first label is kept")

    def window_quality(self) -> dict[str, dict[str, Any]]:
        """Per model version: ``monitoring.quality`` over its last ``window`` labelled answers."""
        with self._lock:
            rows = self._db.execute(
                """SELECT model_version, probabilities, label FROM (
                       SELECT a.model_version, a.probabilities, l.label, ROW_NUMBER() OVER (
                           PARTITION BY a.model_version ORDER BY l.time DESC, l.rowid DESC) AS k
                       FROM labels l JOIN answers a USING (request_id))
                   WHERE k <= ?""",
                (self.window,),
            ).fetchall()
        by_version: dict[str, tuple[list, list]] = {}
        for version, probabilities, label in rows:
            rows_of, labels_of = by_version.setdefault(version, ([], []))
            rows_of.append(json.loads(probabilities))
            labels_of.append(self.labels.index(label))
        return {v: quality(np.array(p), y, self.labels) for v, (p, y) in sorted(by_version.items())}

    def label_delays(self) -> list[float]:
        """Seconds between each stored label and its answer."""
        with self._lock:
            return [
                d for (d,) in self._db.execute("SELECT l.time - a.time FROM labels l JOIN answers a USING (request_id)")
            ]

    def metrics(self) -> str:
        """Prometheus' text format of the live quality (module docstring)."""
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:.6g}" for labels, value in samples)

        windows = self.window_quality()

        def per_version(key: str) -> list[tuple[str, float]]:
            return [(f'{{version="{v}"}}', q[key]) for v, q in windows.items() if q[key] is not None]

        def per_class(key: str) -> list[tuple[str, float]]:
            return [(f'{{version="{v}",label="{c}"}}', x) for v, q in windows.items() for c, x in q[key].items()]

        family("emotion_quality_labelled", "gauge", "labelled answers in the window", per_version("labelled"))
        family("emotion_quality_window", "gauge", "labelled answers the window holds at most", [("", self.window)])
        family(
            "emotion_quality_accuracy",
            "gauge",
            "accuracy of the labelled answers in the window",
            per_version("accuracy"),
        )
        family("emotion_quality_macro_f1", "gauge", "macro-F1 over the labelled classes", per_version("macro_f1"))
        for key in ("precision", "recall", "f1"):
            family(f"emotion_quality_{key}", "gauge", f"per-class {key} in the window", per_class(key))
        confusion = [
            (f'{{version="{v}",true="{t}",predicted="{p}"}}', n)
            for v, q in windows.items()
            for t, row in q["confusion"].items()
            for p, n in row.items()
        ]
        family("emotion_quality_confusion", "gauge", "labelled answers by true and predicted label", confusion)
        family("emotion_quality_ece", "gauge", "expected calibration error (10 bins) in the window", per_version("ece"))
        family("emotion_quality_brier", "gauge", "Brier score in the window", per_version("brier"))
        delays = self.label_delays()
        buckets = [(f'{{le="{b}"}}', sum(d <= b for d in delays)) for b in DELAY_BUCKETS]
        family(
            "emotion_feedback_label_delay_seconds",
            "histogram",
            "seconds between an answer and its label",
            [],
        )
        lines.extend(f"emotion_feedback_label_delay_seconds_bucket{b} {n}" for b, n in buckets)
        lines.append(f'emotion_feedback_label_delay_seconds_bucket{{le="+Inf"}} {len(delays)}')
        lines.append(f"emotion_feedback_label_delay_seconds_sum {sum(delays):.6g}")
        lines.append(f"emotion_feedback_label_delay_seconds_count {len(delays)}")
        family(
            "emotion_feedback_items_total",
            "counter",
            "feedback items by outcome since the service started",
            [(f'{{result="{r}"}}', n) for r, n in sorted(self.outcomes.items())],
        )
        return "\n".join(lines) + "\n"


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


class FeedbackServer:
    """``POST /feedback`` into a :class:`FeedbackStore`, on a loopback port, in threads of the
    calling process (the stack's supervisor)."""

    def __init__(self, store: FeedbackStore, port: int = 0, host: str = LOOPBACK) -> None:
        self.store = store
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/feedback":
                    return self._send(404, ERRORS.error_body("NotFound", "POST /feedback"))
                status, body = outer.handle_post(self._body(), self.headers.get("X-Request-ID"))
                self._send(status, body)

            def _body(self) -> bytes | None:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    return None
                return self.rfile.read(length) if 0 <= length <= MAX_BODY_BYTES else None

            def _send(self, status: int, body: dict) -> None:
                payload = (json.dumps(body) + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

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
            outcomes = self.store.submit(payload)
            counts: dict[str, int] = {}
            for o in outcomes:
                counts[o.result] = counts.get(o.result, 0) + 1
            return 200, {"results": [o.to_json() for o in outcomes], "counts": counts}
        (outcome,) = self.store.submit([payload])
        return outcome.status, outcome.to_json()

    def _serve(self) -> None:
        # Feedback is background work: its threads (this one and the request threads it starts,
        # which inherit its nice value) yield the CPU to the model's workers and the gateway, so a
        # flood of labels cannot slow predictions on a busy machine. Linux sets nice per thread.
        if sys.platform == "linux":
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), FEEDBACK_NICENESS)
            except OSError as err:
                log.warning("feedback service at normal CPU priority: %s", err)
        self.httpd.serve_forever()

    def start(self) -> FeedbackServer:
        self._thread = threading.Thread(target=self._serve, name="feedback", daemon=True)
        self._thread.start()
        log.info("feedback service on %s:%d, store %s", LOOPBACK, self.port, self.store.path)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.close()
