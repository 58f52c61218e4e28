"""Delayed ground truth: ``POST /feedback`` joined to the answers served, and live quality metrics.

A client that learns the true label of a text it sent (a user's correction, a reviewer's verdict,
an outcome days later) posts it with the answer's ``request_id``::

    POST /feedback  {"request_id": "6f1c...", "label": "joy"}
    POST /feedback  [{"request_id": "...", "label": "joy"}, ...]        (at most MAX_ITEMS)

The gateway authenticates it with the client key and limits it on its own rate zone, then hands it
to the feedback service (``serving.feedback_service``), a process of its own at the lowest CPU
priority: no prediction waits on it.

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

:meth:`FeedbackStore.metrics` (Prometheus' text format; the feedback service serves it and the
supervisor appends it to the gateway's ``/metrics``, which Prometheus scrapes already) reports,
per model version, over the last ``window`` labelled answers: how many, accuracy, per-class
precision, recall and F1 (a class with no label, or never predicted, is absent, not 0), confusion
counts, expected calibration error (10 bins) and Brier score (``monitoring.quality``), plus a
histogram of the delay between an answer and its label and counters of outcomes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitoring.quality import quality
from project import handler_module

log = logging.getLogger("serving.feedback")

MAX_ITEMS = 1000
MAX_BODY_BYTES = 1 << 20
RETENTION_DAYS = 7.0
QUALITY_WINDOW = 1000
# Labels the feedback service takes per second at most: a flood is paced (its requests wait their
# turn), so that it takes a bounded share of the CPU and its caches from predictions. An answer
# gets one label at most, and 5,000/s is over ten times what this service answers on two cores.
ITEMS_PER_S = 5_000
LOOKUP_CHUNK = 500  # ids per IN (...) query (SQLite's bound on parameters is 999 in old builds)
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

    def ingest(self, prune: bool = True) -> int:
        """Store the answers the request log gained since the last call; returns how many.

        Each file is read from where the last call stopped (by inode, so a rotated file is not read
        again); lines without a request id or probabilities, and ids already stored (a retried
        attempt answered twice), are skipped. With ``prune`` (the supervisor's periodic call),
        answers past twice the retention are dropped with their labels.
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
            if not prune:
                return added
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
        (module docstring). Ids the store does not know yet are looked for in the request log first.

        One lookup and one insert per call, whatever the number of items: a list of 1,000 costs a
        few queries, not thousands."""
        checked = [self._check(item) for item in items]
        wanted = {c[0] for c in checked if isinstance(c, tuple)}
        if wanted:
            with self._lock:
                missing = len(self._lookup(self._db, wanted)) < len(wanted)
            if missing and self._log_grew():
                self.ingest(prune=False)
        now = self.clock()
        outcomes: list[Outcome] = []
        with self._transaction() as db:
            known = self._lookup(db, wanted)
            new_labels: list[tuple[str, str, float]] = []
            for item in checked:
                outcomes.append(item if isinstance(item, Outcome) else self._judge(known, *item, now, new_labels))
            db.executemany("INSERT INTO labels VALUES (?, ?, ?)", new_labels)
        for outcome in outcomes:
            self.outcomes[outcome.result] = self.outcomes.get(outcome.result, 0) + 1
        return outcomes

    def _check(self, item: Any) -> Outcome | tuple[str, str]:
        if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
            return Outcome(400, "invalid", None, 'an item is {"request_id": "<id of an answer>", "label": "<label>"}')
        rid, label = item["request_id"], item["label"]
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
            return Outcome(400, "invalid", None, "request_id must be 1 to 64 of [A-Za-z0-9._-]")
        if not isinstance(label, str) or label not in self.labels:
            return Outcome(400, "invalid", rid, f"label must be one of {self.labels}")
        return rid, label

    @staticmethod
    def _lookup(db: sqlite3.Connection, ids: set[str]) -> dict[str, list]:
        """``request_id -> [answer time, its label or None]`` for those of ``ids`` the store holds."""
        found: dict[str, list] = {}
        ordered = sorted(ids)
        for start in range(0, len(ordered), LOOKUP_CHUNK):
            chunk = ordered[start : start + LOOKUP_CHUNK]
            rows = db.execute(
                "SELECT a.request_id, a.time, l.label FROM answers a LEFT JOIN labels l USING (request_id)"
                f" WHERE a.request_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update((rid, [when, label]) for rid, when, label in rows)
        return found

    def _log_grew(self) -> bool:
        """Whether a request-log file holds bytes :meth:`ingest` has not read (a stat per file)."""
        with self._lock:
            positions = dict(self._db.execute("SELECT inode, offset FROM log_position"))
        for path in self._monitor.request_log_files(self.log_dir):
            try:
                info = path.stat()
            except OSError:
                continue
            if info.st_size > positions.get(info.st_ino, 0):
                return True
        return False

    def _judge(self, known: dict[str, list], rid: str, label: str, now: float, new_labels: list) -> Outcome:
        """One item's outcome against ``known`` (updated, so an id twice in one list is judged in order)."""
        answer = known.get(rid)
        if answer is None:
            return Outcome(404, "unknown", rid, "no answer with this request_id was served")
        when, previous = answer
        if now - when > self.retention_s:
            return Outcome(410, "expired", rid, f"the answer is older than {self.retention_s / 86400:g} days")
        if previous is None:
            answer[1] = label
            new_labels.append((rid, label, now))
            return Outcome(200, "accepted", rid)
        if previous == label:
            return Outcome(200, "duplicate", rid)
        return Outcome(409, "conflict", rid, f"already labelled {previous!r}: the first label is kept")

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

    def label_delays(self) -> tuple[list[int], int, float]:
        """The delay between each stored label and its answer, as a histogram: the cumulative count
        at each of ``DELAY_BUCKETS``, the count and the sum in seconds (counted by SQLite: constant
        memory however many labels the store holds)."""
        columns = ", ".join(f"COALESCE(SUM(d <= {float(b)!r}), 0)" for b in DELAY_BUCKETS)
        with self._lock:
            *cumulative, count, total = self._db.execute(
                f"SELECT {columns}, COUNT(*), COALESCE(SUM(d), 0.0) FROM "
                "(SELECT l.time - a.time AS d FROM labels l JOIN answers a USING (request_id))"
            ).fetchone()
        return list(cumulative), count, total

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
        cumulative, count, total = self.label_delays()
        buckets = [(f'{{le="{b}"}}', n) for b, n in zip(DELAY_BUCKETS, cumulative, strict=True)]
        family(
            "emotion_feedback_label_delay_seconds",
            "histogram",
            "seconds between an answer and its label",
            [],
        )
        lines.extend(f"emotion_feedback_label_delay_seconds_bucket{b} {n}" for b, n in buckets)
        lines.append(f'emotion_feedback_label_delay_seconds_bucket{{le="+Inf"}} {count}')
        lines.append(f"emotion_feedback_label_delay_seconds_sum {total:.6g}")
        lines.append(f"emotion_feedback_label_delay_seconds_count {count}")
        family(
            "emotion_feedback_items_total",
            "counter",
            "feedback items by outcome since the service started",
            [(f'{{result="{r}"}}', n) for r, n in sorted(self.outcomes.items())],
        )
        return "\n".join(lines) + "\n"
