"""A safe rollout of a candidate archive: shadow, canary, promotion, or rollback (``make rollout``).

    python -m serving.rollout CANDIDATE.mar [--shadow-percent 50] [--steps 5,25,50] [--hold 60] ...

The candidate is registered beside the running version of the model, as a version of its own, on
the stack ``make serve`` runs. Then:

1. **shadow**: ``--shadow-percent`` of the requests the current version answers are mirrored to the
   candidate by the gateway (nginx ``mirror``; the client only ever gets the current answer);
2. **canary**: the gateway sends ``--steps`` percent (5, 25, 50) of the model's requests to the
   candidate, while the current version's share is still mirrored;
3. **promotion**: the candidate becomes TorchServe's default, the gateway's routes are removed,
   and once the requests in flight to the old version are answered it is unregistered; the
   candidate's archive replaces the served one in the model store, so a restart serves it.

Each phase lasts until its gates have held for ``--hold`` seconds on at least ``--min-samples``
samples; the first gate that breaches on enough samples rolls back (routes removed, requests in
flight answered, the candidate unregistered). The gates (:class:`Gates`): label agreement of the
two versions on the same texts, the mean total-variation distance of their probabilities, the
candidate's 5xx rate, its p99 latency against the current version's, and (when labels arrive
through ``POST /feedback``) its live accuracy against the current version's.

Where the figures come from: the handler's request log (the two answers to one mirrored text: the
client's request id and the ``shadow-<id>`` the gateway gives the mirror), the gateway's access log
(each request's version, status and upstream seconds) and its ``shadow.log`` (the mirrors').

Exit codes: 0 promoted, 3 rolled back, 2 refused (another rollout runs), 1 any other error.
The state (``<workdir>/rollout.json``) is written at each step; a restart of the stack ends a
rollout (no routes, only the served archive registered: one default version), and the next
rollout first clears what a killed one left. Progress goes to stdout; metrics to
``<workdir>/gateway/rollout.prom`` (``/metrics/rollout`` on the gateway's metrics port); at the
end a summary table and ``<workdir>/rollout.png`` (agreement and p99 latency over time).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from project import ARCHIVE_NAME, MODEL_NAME, MODEL_STORE, SERVE_DIR
from serving.client import ManagementError, TorchServeClient, count_ready
from serving.gateway import ROLLOUT_CONF, apply_routes, rollout_conf
from serving.server import read_properties
from serving.shadow import ShadowRelay, set_idle

log = logging.getLogger("serving.rollout")

EXIT_PROMOTED, EXIT_ERROR, EXIT_REFUSED, EXIT_ROLLED_BACK = 0, 1, 2, 3
STATE_FILE = "rollout.json"
METRICS_FILE = "rollout.prom"
FINAL = ("promoted", "rolled_back")
# Seconds a phase waits for a stack that stopped answering (a restart) before rolling back.
STACK_DOWN_LIMIT = 180.0


@dataclass(frozen=True)
class Gates:
    """What a candidate must hold to go on: each judged on a window with enough samples."""

    min_agreement: float = 0.97  # share of mirrored texts both versions give the same label
    max_mean_tv: float = 0.05  # mean total-variation distance of their probabilities
    max_error_rate: float = 0.01  # the candidate's share of 5xx answers
    max_p99_ratio: float = 1.5  # its p99 upstream latency over the current version's
    max_accuracy_drop: float = 0.02  # live accuracy (labels through /feedback) below the current's
    min_samples: int = 200  # pairs, and answers of each version, per judged window
    min_labels: int = 100  # labelled answers of each version for the accuracy gate


@dataclass(frozen=True)
class Plan:
    """How traffic moves to the candidate."""

    shadow_percent: float = 50.0
    steps: tuple[float, ...] = (5.0, 25.0, 50.0)
    hold: float = 60.0  # seconds the gates must hold, per phase
    phase_timeout: float = 900.0  # a phase without enough samples by then: rolled back
    interval: float = 2.0  # seconds between judgements


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict: ``ok`` None when the window has fewer samples than it needs."""

    name: str
    value: float | None
    threshold: float
    at_least: bool  # the value must be >= threshold (else <=)
    samples: int
    ok: bool | None


@dataclass
class Window:
    """What one phase saw: mirrored pairs and each version's answers."""

    pairs: list[tuple[Sequence[float], Sequence[float]]] = field(default_factory=list)
    flips: Counter = field(default_factory=Counter)  # (current label, candidate label) -> count
    statuses: dict[str, list[int]] = field(default_factory=lambda: {"current": [], "candidate": []})
    seconds: dict[str, list[float]] = field(default_factory=lambda: {"current": [], "candidate": []})
    accuracy: dict[str, tuple[float, int]] = field(default_factory=dict)  # version -> (accuracy, labels)


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def argmax(row: Sequence[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def judge(window: Window, gates: Gates, latency: bool = True) -> list[GateResult]:
    """Each gate's value on ``window`` against its threshold; ``latency`` False: no latency gate
    (in shadow, the candidate runs at the lowest CPU priority: its latency means nothing yet)."""
    pairs = len(window.pairs)
    enough_pairs = pairs >= gates.min_samples
    agreement = sum(argmax(p) == argmax(q) for p, q in window.pairs) / pairs if pairs else None
    tv = sum(total_variation(p, q) for p, q in window.pairs) / pairs if pairs else None
    codes = window.statuses["candidate"]
    errors = sum(code >= 500 for code in codes) / len(codes) if codes else None
    current, candidate = window.seconds["current"], window.seconds["candidate"]
    both = min(len(current), len(candidate))
    ratio = p99(candidate) / max(p99(current), 1e-3) if current and candidate else None
    agreement_ok = None if not enough_pairs else agreement >= gates.min_agreement
    tv_ok = None if not enough_pairs else tv <= gates.max_mean_tv
    errors_ok = None if len(codes) < gates.min_samples else errors <= gates.max_error_rate
    ratio_ok = None if both < gates.min_samples else ratio <= gates.max_p99_ratio
    results = [
        GateResult("agreement", agreement, gates.min_agreement, True, pairs, agreement_ok),
        GateResult("mean_tv", tv, gates.max_mean_tv, False, pairs, tv_ok),
        GateResult("error_rate", errors, gates.max_error_rate, False, len(codes), errors_ok),
        GateResult("p99_ratio", ratio, gates.max_p99_ratio, False, both, ratio_ok),
    ]
    if not latency:
        results.pop()
    labelled = window.accuracy
    if "current" in labelled and "candidate" in labelled:
        (now, n_now), (new, n_new) = labelled["current"], labelled["candidate"]
        drop = now - new
        enough = min(n_now, n_new) >= gates.min_labels
        results.append(
            GateResult(
                "accuracy_drop", drop, gates.max_accuracy_drop, False, min(n_now, n_new),
                None if not enough else drop <= gates.max_accuracy_drop,
            )
        )  # fmt: skip
    return results


def decide(results: Sequence[GateResult]) -> str:
    """``breach`` when a gate failed on enough samples, ``pass`` when the traffic gates hold on
    enough samples (the accuracy gate counts once it has its labels), else ``wait``."""
    if any(r.ok is False for r in results):
        return "breach"
    required = [r for r in results if r.name != "accuracy_drop"]
    return "pass" if all(r.ok for r in required) else "wait"


ACCESS_LINE = re.compile(
    r'"(?:POST) /(?:predictions/(?P<model>[^/ ]+)|v2/models/(?P<oip_model>[^/ ]+)/infer) [^"]*" '
    r"(?P<status>\d{3}) upstream=\[[^\]]*\] seconds=\S+ "
    r"upstream_seconds=\[(?P<upstream>[^\]]*)\] request_id=\S+ version=(?P<version>\S*)$"
)


def last_seconds(field_text: str) -> float | None:
    """The upstream seconds of the attempt that answered (the last in nginx's list)."""
    value = field_text.replace(",", " ").replace(":", " ").split()[-1] if field_text.strip() else "-"
    try:
        return float(value)
    except ValueError:
        return None


class Tail:
    """The complete lines appended to a file since the last read (from its start when it was
    replaced or truncated)."""

    def __init__(self, path: Path, from_end: bool = True) -> None:
        self.path = Path(path)
        self.offset, self.inode, self.partial = 0, None, b""
        if from_end and self.path.exists():
            stat = self.path.stat()
            self.offset, self.inode = stat.st_size, stat.st_ino

    def lines(self) -> list[str]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.offset, self.inode, self.partial = 0, stat.st_ino, b""
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete if line]


class Collector:
    """Reads the logs of one stack into the current phase's :class:`Window`."""

    def __init__(
        self, workdir: Path, model: str, current: str, candidate: str, labels: Sequence[str], relay: ShadowRelay
    ) -> None:
        self.model, self.current, self.candidate, self.labels = model, current, candidate, list(labels)
        gateway = Path(workdir) / "gateway"
        self.access = Tail(gateway / "access.log")
        self.relay = relay
        self.latency = True  # record the candidate's seconds (not in shadow: it runs idle there)
        self.requests = Tail(Path(workdir) / "torchserve" / "logs" / "requests.jsonl")
        self.answers: dict[str, tuple[str, list[float]] | None] = {}  # None: the id came twice
        self.pending: dict[str, str] = {}  # shadow id -> client id
        self.window = Window()

    def new_window(self) -> None:
        self.window = Window()

    def poll(self) -> None:
        for line in self.requests.lines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                rid = entry["request_id"]
                row = [float(entry["probabilities"][name]) for name in self.labels]
                self.answers[rid] = None if rid in self.answers else (str(entry.get("model_version")), row)
        for answer in self.relay.take():
            status = answer.status or 502  # no answer: the candidate failed it
            self.window.statuses["candidate"].append(status)
            if self.latency and status < 500:
                self.window.seconds["candidate"].append(answer.seconds)
            if status == 200:
                self.pending[answer.shadow_id] = answer.client_id
        for line in self.access.lines():
            match = ACCESS_LINE.search(line)
            if not match or (match["model"] or match["oip_model"]) != self.model:
                continue
            who = "candidate" if match["version"] == f"/{self.candidate}" else "current"
            status, seconds = int(match["status"]), last_seconds(match["upstream"])
            self.window.statuses[who].append(status)
            if seconds is not None and status < 500:
                self.window.seconds[who].append(seconds)
        for sid, rid in list(self.pending.items()):
            pairs = self._pairs(sid, rid)
            if pairs is None:
                continue
            del self.pending[sid]
            for served, mirrored in pairs:
                if mirrored[0] == self.candidate and served[0] == self.current:
                    self.window.pairs.append((served[1], mirrored[1]))
                    self.window.flips[(self.labels[argmax(served[1])], self.labels[argmax(mirrored[1])])] += 1
        if len(self.pending) > 100_000:  # mirrors whose answers never came (failed): forgotten
            self.pending.clear()

    def _pairs(self, sid: str, rid: str) -> list[tuple[tuple, tuple]] | None:
        """The (served, mirrored) answers of one mirrored request: one for a text, one per text
        for a list or an OIP request (their answers are logged as ``<id>.<position>``); None
        while they are not all in the request log yet."""
        if sid in self.answers or rid in self.answers:
            mirrored, served = self.answers.get(sid), self.answers.get(rid)
            if mirrored is None or served is None:
                # an id that came twice, or the other answer is not logged yet
                return [] if sid in self.answers and rid in self.answers else None
            return [(served, mirrored)]
        pairs = []
        for position in itertools.count():
            mirrored, served = self.answers.get(item_id(sid, position)), self.answers.get(item_id(rid, position))
            if mirrored is None and served is None:
                break
            if mirrored is None or served is None:
                return None
            pairs.append((served, mirrored))
        return pairs or None


def item_id(request_id: str, position: int) -> str:
    """The id of the text at ``position`` of a list request (the handler's ``Batch.item_id``)."""
    suffix = f".{position}"
    return request_id[: 64 - len(suffix)] + suffix


def stage_candidate(archive: Path, store: Path, model: str, version: str) -> Path:
    """Copy ``archive`` into the model store as ``<model>-<version>.mar`` with ``version`` as its
    manifest's version (TorchServe keys a model's versions by it; the handler logs it)."""
    target = Path(store) / f"{model}-{version}.mar"
    staged = target.with_suffix(".tmp")
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(staged, "w", zipfile.ZIP_STORED) as out:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest.setdefault("model", {})["modelVersion"] = version
                data = json.dumps(manifest, indent=2).encode()
            out.writestr(item, data)
    staged.replace(target)
    return target


def archive_labels(archive: Path) -> list[str]:
    """The label names, in the model's order, of an archive (its golden record)."""
    from serving.golden import GoldenRecord

    return list(GoldenRecord.from_archive(archive).probabilities[0])


def stack_client(workdir: Path) -> TorchServeClient:
    """A client of the TorchServe of the stack in ``workdir``, from the addresses it runs with now
    (a stack restarted on free ports has new ones).

    Raises:
        FileNotFoundError: no stack has run in ``workdir``.
    """
    config = Path(workdir) / "torchserve" / "config.properties"
    if not config.exists():
        raise FileNotFoundError(f"no stack runs in {workdir}: start one first (make serve)")
    props = read_properties(config)
    key_file = Path(workdir) / "torchserve" / "key_file.json"
    return TorchServeClient(
        props["inference_address"], props["management_address"], key_file if key_file.exists() else None
    )


@dataclass
class State:
    """What a rollout has done so far (``rollout.json``)."""

    phase: str
    candidate: str
    current: str
    archive: str
    pid: int
    started: float
    canary_percent: float = 0.0
    shadow_percent: float = 0.0
    reason: str = ""
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path) -> None:
        staged = path.with_suffix(".tmp")
        staged.write_text(json.dumps(asdict(self), indent=2))
        staged.replace(path)


def end_after_restart(workdir: Path) -> None:
    """Called as the stack starts: a rollout it did not finish is over (no routes, only the served
    archive registered), recorded as rolled back."""
    path = Path(workdir) / STATE_FILE
    with contextlib.suppress(OSError, ValueError, TypeError):
        state = State(**json.loads(path.read_text()))
        if state.phase not in FINAL:
            state.phase, state.reason = "rolled_back", "the stack restarted during the rollout"
            state.canary_percent = state.shadow_percent = 0.0
            state.save(path)


class Rollout:
    """One rollout of ``archive`` on the stack in ``workdir`` (see the module docstring)."""

    def __init__(
        self,
        archive: Path,
        workdir: Path = SERVE_DIR,
        model_store: Path = MODEL_STORE,
        served_archive: str = ARCHIVE_NAME,
        model: str = MODEL_NAME,
        gates: Gates | None = None,
        plan: Plan | None = None,
        out: Callable[[str], None] = print,
    ) -> None:
        self.archive, self.workdir, self.model_store = Path(archive), Path(workdir), Path(model_store)
        self.served_archive, self.model = served_archive, model
        self.gates, self.plan, self.out = gates or Gates(), plan or Plan(), out
        self.client = stack_client(self.workdir)
        self.state_path = self.workdir / STATE_FILE
        self.gateway_dir = self.workdir / "gateway"
        self.state: State | None = None
        self.relay: ShadowRelay | None = None
        self.timeline: list[dict] = []

    # --- the routes and versions -------------------------------------------------------------

    def _routes(self, canary: float, shadow: float) -> None:
        candidate = self.state.candidate if (canary or shadow) else None
        relay = self.relay.address if self.relay is not None and shadow else None
        if not apply_routes(self.gateway_dir, rollout_conf(candidate, canary, shadow, relay), shadow=relay is not None):
            raise RuntimeError("the gateway did not take the rollout's routes")
        self.state.canary_percent, self.state.shadow_percent = canary, shadow
        self.state.save(self.state_path)

    def _versions(self) -> dict[str, dict]:
        return {str(v["modelVersion"]): v for v in self.client.describe(self.model)}

    def _clear_stale(self) -> None:
        """Undo what a rollout killed mid-way left: its routes and its registered candidate."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            stale = State(**json.loads(self.state_path.read_text()))
            if stale.phase in FINAL:
                return
            self.out(f"clearing the unfinished rollout of {stale.candidate} (process {stale.pid} is gone)")
            if (self.gateway_dir / ROLLOUT_CONF).read_text() != rollout_conf():
                apply_routes(self.gateway_dir, rollout_conf())
            default = self.client.default_version(self.model)
            if str(default.get("modelVersion")) != stale.candidate and stale.candidate in self._versions():
                self.client.unregister(self.model, stale.candidate)
            stale.phase, stale.reason = "rolled_back", "a later rollout cleared it (its process was gone)"
            stale.save(self.state_path)

    # --- the run -----------------------------------------------------------------------------

    def _remove_unused_candidates(self) -> None:
        """Delete the staged archives of earlier rollouts that no registered version uses."""
        used = {str(v.get("modelUrl")) for v in self._versions().values()}
        for path in self.model_store.glob(f"{self.model}-*-rollout*.mar"):
            if path.name not in used:
                path.unlink(missing_ok=True)

    def run(self) -> int:
        """Register, shadow, canary, promote or roll back; returns the exit code."""
        self._clear_stale()
        self._remove_unused_candidates()
        default = self.client.default_version(self.model)
        current = str(default["modelVersion"])
        candidate = f"{current.split('-rollout')[0]}-rollout{time.strftime('%Y%m%d%H%M%S')}"
        staged = stage_candidate(self.archive, self.model_store, self.model, candidate)
        self.state = State("registering", candidate, current, staged.name, os.getpid(), time.time())
        self.state.save(self.state_path)
        labels = archive_labels(staged)
        self.out(f"rollout of {self.archive} as {self.model} version {candidate}, beside {current}")
        workers = max(1, count_ready(default))
        try:
            self.client.register(staged.name, model_name=self.model, initial_workers=workers, synchronous="true")
        except Exception as err:
            staged.unlink(missing_ok=True)
            self.state.phase, self.state.reason = "rolled_back", f"the candidate could not be registered: {err}"
            self.state.save(self.state_path)
            raise RuntimeError(self.state.reason) from err
        self.relay = ShadowRelay(
            f"{self.client.inference_url}/predictions/{self.model}/{candidate}",
            lambda: self.client.headers("inference"),
        ).start()
        collector = Collector(self.workdir, self.model, current, candidate, labels, self.relay)
        try:
            phases = [("shadow", 0.0)] + [(f"canary {step:g}%", step) for step in self.plan.steps]
            for name, canary in phases:
                verdict = self._phase(name, canary, collector)
                if verdict != "pass":
                    return self._roll_back(verdict)
            return self._promote()
        except (KeyboardInterrupt, SystemExit):
            return self._roll_back("interrupted")
        except Exception as err:
            log.exception("rollout failed")
            self._roll_back(f"error: {err}")
            return EXIT_ERROR
        finally:
            self.relay.stop()
            self._finish()

    def _phase(self, name: str, canary: float, collector: Collector) -> str:
        """Run one phase; returns ``pass`` or the reason of a rollback."""
        self.state.phase = name
        shadow_only = canary == 0
        # In shadow the candidate's workers take only the cores the current version leaves idle.
        self._candidate_idle(shadow_only)
        collector.latency = not shadow_only
        self._routes(canary, self.plan.shadow_percent)
        collector.new_window()
        started = time.monotonic()
        held_since: float | None = None
        down_since: float | None = None
        while True:
            time.sleep(self.plan.interval)
            try:
                versions = self._versions()
            except (requests.RequestException, ManagementError, OSError, KeyError) as err:
                down_since = time.monotonic() if down_since is None else down_since
                if time.monotonic() - down_since > STACK_DOWN_LIMIT:
                    return f"the stack did not answer for {STACK_DOWN_LIMIT:g} s ({err})"
                with contextlib.suppress(OSError, KeyError):
                    self.client = stack_client(self.workdir)
                continue
            down_since = None
            if self.state.candidate not in versions:
                return "the candidate is no longer registered (the stack restarted)"
            collector.poll()
            collector.window.accuracy = self._accuracy()
            results = judge(collector.window, self.gates, latency=not shadow_only)
            verdict = decide(results)
            self._record(name, canary, results, collector.window)
            if verdict == "breach":
                failed = [r for r in results if r.ok is False]
                return "; ".join(f"{r.name} {r.value:.4g} against {r.threshold:g}" for r in failed)
            now = time.monotonic()
            if verdict == "pass":
                held_since = now if held_since is None else held_since
                if now - held_since >= self.plan.hold:
                    return "pass"
            else:
                held_since = None
            if now - started > self.plan.phase_timeout:
                return f"{name}: not enough samples in {self.plan.phase_timeout:g} s"

    def _candidate_idle(self, idle: bool) -> None:
        with contextlib.suppress(Exception):
            (version,) = self.client.describe(self.model, self.state.candidate)
            pids = [w["pid"] for w in version.get("workers", []) if isinstance(w.get("pid"), int)]
            set_idle(pids, idle)

    def _accuracy(self) -> dict[str, tuple[float, int]]:
        """Live accuracy per version from the feedback store, when it has labels for both."""
        path = self.workdir / "feedback.sqlite"
        if not path.exists():
            return {}
        import sqlite3

        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as db:
                rows = db.execute(
                    "SELECT a.model_version, a.probabilities, l.label FROM labels l JOIN answers a USING (request_id)"
                    " WHERE a.model_version IN (?, ?) AND l.time >= ?",
                    (self.state.current, self.state.candidate, self.state.started),
                ).fetchall()
        except sqlite3.Error:
            return {}
        labels = archive_labels(self.model_store / self.state.archive)
        tally: dict[str, list[int]] = {}
        for version, probabilities, label in rows:
            right = labels[argmax(json.loads(probabilities))] == label
            tally.setdefault(version, []).append(int(right))
        names = {self.state.current: "current", self.state.candidate: "candidate"}
        return {names[v]: (sum(hits) / len(hits), len(hits)) for v, hits in tally.items() if hits}

    def _record(self, name: str, canary: float, results: Sequence[GateResult], window: Window) -> None:
        seconds = window.seconds
        point = {
            "time": time.time() - self.state.started,
            "phase": name,
            "canary_percent": canary,
            "gates": {r.name: (r.value, r.threshold, r.ok, r.samples) for r in results},
            "p99_current": p99(seconds["current"]) if seconds["current"] else None,
            "p99_candidate": p99(seconds["candidate"]) if seconds["candidate"] else None,
        }
        self.timeline.append(point)
        shown = "  ".join(
            f"{r.name}={'-' if r.value is None else f'{r.value:.4g}'}{'>=' if r.at_least else '<='}{r.threshold:g}"
            f"[{'ok' if r.ok else 'FAIL' if r.ok is False else 'wait'} n={r.samples}]"
            for r in results
        )
        self.out(f"{point['time']:7.1f}s {name:12s} canary {canary:g}% shadow {self.plan.shadow_percent:g}%  {shown}")
        write_metrics(self.gateway_dir / METRICS_FILE, self.state, results, window)

    def _promote(self) -> int:
        state = self.state
        state.phase = "promoting"
        state.save(self.state_path)
        self.client.set_default(self.model, state.candidate)
        self._routes(0.0, 0.0)  # every request to the default; the old routes' requests answered
        self.client.unregister(self.model, state.current)
        served = self.model_store / self.served_archive
        if served.exists():
            shutil.copy2(served, served.with_suffix(".previous.mar"))
        shutil.copy2(self.model_store / state.archive, served.with_suffix(".tmp"))
        served.with_suffix(".tmp").replace(served)
        state.phase, state.reason = "promoted", "every gate held in every phase"
        state.save(self.state_path)
        log.info("rollout of %s: promoted (%s)", state.candidate, state.reason)
        self.out(f"promoted {state.candidate}: the default version; {state.current} unregistered")
        return EXIT_PROMOTED

    def _roll_back(self, reason: str) -> int:
        state = self.state
        self.out(f"rolling back {state.candidate}: {reason}")
        with contextlib.suppress(Exception):
            self._routes(0.0, 0.0)
        with contextlib.suppress(Exception):
            if state.candidate in self._versions():
                self.client.unregister(self.model, state.candidate)
        with contextlib.suppress(OSError):
            (self.model_store / state.archive).unlink()
        state.phase, state.reason = "rolled_back", reason
        state.save(self.state_path)
        log.warning("rollout of %s: rolled back (%s)", state.candidate, reason)
        return EXIT_ROLLED_BACK

    def _finish(self) -> None:
        state = self.state
        with contextlib.suppress(Exception):
            write_metrics(self.gateway_dir / METRICS_FILE, state, [], Window())
        self.out(summary(state, self.timeline))
        with contextlib.suppress(Exception):
            plot(self.timeline, self.workdir / "rollout.png", state)
            self.out(f"plot: {self.workdir / 'rollout.png'}")


def summary(state: State, timeline: Sequence[dict]) -> str:
    """The end-of-rollout table: each phase's last gate values."""
    last: dict[str, dict] = {}
    for point in timeline:
        last[point["phase"]] = point
    gates = sorted({g for p in last.values() for g in p["gates"]})
    lines = [f"rollout of {state.candidate} (beside {state.current}): {state.phase} - {state.reason}", ""]
    lines.append("| phase | " + " | ".join(gates) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in gates) + " |")
    for name, point in last.items():
        cells = []
        for gate in gates:
            value, _, ok, samples = point["gates"].get(gate, (None, 0, None, 0))
            shown = "-" if value is None else f"{value:.4g}"
            cells.append(f"{shown} ({'ok' if ok else 'FAIL' if ok is False else 'wait'}, n={samples})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_metrics(path: Path, state: State, results: Sequence[GateResult], window: Window) -> None:
    """The rollout's Prometheus text (per version, per gate, the flip matrix, the decision)."""
    out = [
        "# HELP emotion_rollout_phase The rollout's phase (1 for the current one).",
        "# TYPE emotion_rollout_phase gauge",
        f'emotion_rollout_phase{{phase="{state.phase}",candidate="{state.candidate}"}} 1',
        "# HELP emotion_rollout_traffic_percent Share of the model's traffic the candidate gets.",
        "# TYPE emotion_rollout_traffic_percent gauge",
        f'emotion_rollout_traffic_percent{{kind="canary"}} {state.canary_percent:g}',
        f'emotion_rollout_traffic_percent{{kind="shadow"}} {state.shadow_percent:g}',
        "# HELP emotion_rollout_gate_value A gate's value on the phase's window.",
        "# TYPE emotion_rollout_gate_value gauge",
    ]
    for r in results:
        if r.value is not None:
            out.append(f'emotion_rollout_gate_value{{gate="{r.name}"}} {r.value:.6g}')
    out += ["# HELP emotion_rollout_gate_threshold A gate's threshold.", "# TYPE emotion_rollout_gate_threshold gauge"]
    out += [f'emotion_rollout_gate_threshold{{gate="{r.name}"}} {r.threshold:g}' for r in results]
    out += ["# HELP emotion_rollout_gate_ok 1 held, 0 breached (absent: too few samples).",
            "# TYPE emotion_rollout_gate_ok gauge"]  # fmt: skip
    out += [f'emotion_rollout_gate_ok{{gate="{r.name}"}} {int(r.ok)}' for r in results if r.ok is not None]
    versions = {"current": state.current, "candidate": state.candidate}
    out += [
        "# HELP emotion_rollout_answers Answers per version in the phase's window.",
        "# TYPE emotion_rollout_answers gauge",
    ]
    for who, codes in window.statuses.items():
        errors = sum(c >= 500 for c in codes)
        out.append(f'emotion_rollout_answers{{version="{versions[who]}",class="5xx"}} {errors}')
        out.append(f'emotion_rollout_answers{{version="{versions[who]}",class="other"}} {len(codes) - errors}')
    out += ["# HELP emotion_rollout_p99_seconds p99 upstream latency per version in the window.",
            "# TYPE emotion_rollout_p99_seconds gauge"]  # fmt: skip
    for who, seconds in window.seconds.items():
        if seconds:
            out.append(f'emotion_rollout_p99_seconds{{version="{versions[who]}"}} {p99(seconds):.6g}')
    out += [
        "# HELP emotion_rollout_flips Mirrored texts by current and candidate label.",
        "# TYPE emotion_rollout_flips gauge",
    ]
    out += [f'emotion_rollout_flips{{current="{a}",candidate="{b}"}} {n}' for (a, b), n in sorted(window.flips.items())]
    if state.phase in FINAL:
        reason = state.reason.replace("\\", "\\\\").replace('"', '\\"')[:200]
        out += [
            "# HELP emotion_rollout_decision The rollout's outcome and its reason.",
            "# TYPE emotion_rollout_decision gauge",
            f'emotion_rollout_decision{{outcome="{state.phase}",reason="{reason}"}} 1',
        ]
    staged = path.with_suffix(".tmp")
    staged.write_text("\n".join(out) + "\n")
    staged.replace(path)


def plot(timeline: Sequence[dict], path: Path, state: State) -> None:
    """Agreement and p99 latency per version over the rollout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p["time"] for p in timeline]
    agreement = [p["gates"].get("agreement", (None,))[0] for p in timeline]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [math.nan if a is None else a for a in agreement], label="label agreement")
    top.axhline(timeline[0]["gates"]["agreement"][1] if timeline else 0.97, color="grey", linestyle="--", label="gate")
    top.set_ylabel("agreement")
    top.legend(loc="lower left")
    for key, label in (("p99_current", state.current), ("p99_candidate", state.candidate)):
        bottom.plot(t, [math.nan if p[key] is None else 1000 * p[key] for p in timeline], label=f"p99 {label}")
    bottom.set_ylabel("p99 upstream ms")
    bottom.set_xlabel("seconds since the rollout started")
    bottom.legend(loc="upper left")
    for point, previous in zip(timeline[1:], timeline, strict=False):
        if point["phase"] != previous["phase"]:
            for axis in (top, bottom):
                axis.axvline(point["time"], color="lightgrey")
    figure.suptitle(f"rollout of {state.candidate}: {state.phase}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _interrupted(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM rolls back, as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("candidate", type=Path, help="the candidate archive (.mar)")
    parser.add_argument("--workdir", type=Path, default=SERVE_DIR, help="the running stack's folder (make serve)")
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--served-archive", default=ARCHIVE_NAME, help="the archive the stack serves at start")
    parser.add_argument("--model", default=MODEL_NAME)
    parser.add_argument("--shadow-percent", type=float, default=Plan.shadow_percent)
    parser.add_argument("--steps", default=",".join(f"{s:g}" for s in Plan.steps), help="canary percentages")
    parser.add_argument("--hold", type=float, default=Plan.hold, help="seconds the gates must hold per phase")
    parser.add_argument("--phase-timeout", type=float, default=Plan.phase_timeout)
    parser.add_argument("--min-samples", type=int, default=Gates.min_samples)
    parser.add_argument("--min-agreement", type=float, default=Gates.min_agreement)
    parser.add_argument("--max-mean-tv", type=float, default=Gates.max_mean_tv)
    parser.add_argument("--max-error-rate", type=float, default=Gates.max_error_rate)
    parser.add_argument("--max-p99-ratio", type=float, default=Gates.max_p99_ratio)
    parser.add_argument("--max-accuracy-drop", type=float, default=Gates.max_accuracy_drop)
    parser.add_argument("--min-labels", type=int, default=Gates.min_labels)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.candidate.is_file():
        print(f"no candidate archive at {args.candidate}", file=sys.stderr)
        return EXIT_ERROR
    try:
        steps = tuple(float(s) for s in args.steps.split(",") if s.strip())
        plan = Plan(args.shadow_percent, steps, args.hold, args.phase_timeout)
        gates = Gates(args.min_agreement, args.max_mean_tv, args.max_error_rate, args.max_p99_ratio,
                      args.max_accuracy_drop, args.min_samples, args.min_labels)  # fmt: skip
        if not all(0 < s <= 100 for s in steps) or not 0 <= plan.shadow_percent <= 100:
            raise ValueError("shares must be percentages (steps in (0, 100], shadow in [0, 100])")
    except ValueError as err:
        print(f"invalid rollout settings: {err}", file=sys.stderr)
        return EXIT_ERROR
    args.workdir.mkdir(parents=True, exist_ok=True)
    lock = open(args.workdir / "rollout.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("another rollout is running on this stack: refused", file=sys.stderr)
        return EXIT_REFUSED
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        rollout = Rollout(args.candidate, args.workdir, args.model_store, args.served_archive, args.model, gates, plan)
        return rollout.run()
    except (OSError, RuntimeError, KeyError) as err:
        print(f"rollout failed: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
