"""What the gateway's ``/ready`` says, whether it lets predictions through, and when the
supervisor gives up and has the service restarted.

TorchServe's ``/ping`` answers "Healthy" while every worker is dead or still failing to load.
:class:`Readiness` asks what matters instead, on TorchServe's own ports (never through the
gateway): how many workers of the served version are READY (management API, every ``interval``
seconds), and whether the served answers to the archive's golden texts agree with the answers the
archived engine gave when the archive was built (``serving.golden``: every probability within the
record's tolerance, the label kept where the recorded margin is outside the noise), every
``golden_interval`` seconds, on a thread of its own so that a slow answer never delays the worker
check.

* ``up``: at least one READY worker of the model's default version, the one
  ``/predictions/<model>`` serves (workers of other versions do not count). Without one, the
  gateway refuses predictions at once (503) instead of letting them wait in TorchServe's queue
  until a timeout.
* ``ready``: ``up`` and every golden answer agreed at the last check. A golden request that
  TorchServe refuses as busy (429, 503), that times out, or that meets a key TorchServe has just
  replaced gives no verdict: the last good verdict is kept, but only while it is younger than
  ``golden_max_age`` seconds. TorchServe answers 503 both for a full queue and for a handler that
  fails every request, so a model that only ever answers 503 is not ready for long.

:class:`Liveness` turns readiness into a restart decision for ``serving run``: a service that
was ready once and has then been not ready for longer than ``UNREADY_EXIT`` seconds exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from project import MODEL_NAME
from serving.client import ManagementError, TorchServeClient, count_ready
from serving.golden import GoldenError, GoldenRecord, judge

log = logging.getLogger(__name__)

# Seconds a good golden verdict is kept while the golden checks get no verdict (busy, timed out):
# six checks at the default golden_interval. Long enough that a burst of overload does not drop
# readiness, short enough that a model answering every request with 503 is soon not ready.
GOLDEN_MAX_AGE = 60.0

# Seconds the service may stay not ready, after it was ready once, before `serving run`
# exits non-zero to have the container restarted. TorchServe restarts a failed worker itself,
# with a growing back-off (1, 1, 2, 3, 5, ... s), and reports it unhealthy once it has failed for
# maxRetryTimeoutInSec (300 s unless the model config sets it; handler/model-config.yaml does not);
# each try may take up to startupTimeout (120 s) to load. 480 s = 300 + 120 + a minute: TorchServe's
# own recovery gets its whole window before the container is restarted.
UNREADY_EXIT = 480.0

# A busy golden answer: TorchServe's queue is full (503), or it throttles (429).
BUSY = (429, 503)


@dataclass
class HealthState:
    """The last verdicts."""

    ready_workers: int = 0
    golden_ok: bool | None = None  # None: not checked yet
    golden_seen: str | None = None  # what the last verdict rests on
    checked_at: float = 0.0
    # minWorkers of the default version (None: not known yet). 0: an operator scaled it to zero.
    expected_workers: int | None = None

    @property
    def up(self) -> bool:
        return self.ready_workers > 0

    @property
    def ready(self) -> bool:
        return self.up and bool(self.golden_ok)


class Readiness:
    """Periodic checks of one model on one TorchServe.

    Args:
        client: The TorchServe to check (its own inference and management ports).
        model: The model the gateway serves.
        golden: The served archive's golden record (None: there is none, so never ready).
        interval: Seconds between worker checks.
        golden_interval: Seconds between golden checks.
        golden_max_age: Seconds a good golden verdict is kept while checks get no verdict.
        workers_timeout: Seconds the worker check waits for TorchServe's describe answer, so that
            it runs about every ``interval`` even when TorchServe is slow. A refused connection
            means no READY worker at once; an answer that does not come in time (TorchServe busy,
            the CPU saturated) keeps the last count for up to ``workers_grace`` seconds after the
            last answer, and no READY worker after that: a slow management answer under load must
            not turn every prediction away.
        workers_grace: See ``workers_timeout``.
        golden_timeout: Seconds the golden request waits for its answer.
        clock: Monotonic seconds (tests pass their own).
        model_store: Where the archives are: when the default version changes (a rollout promoted
            another), the golden record becomes that version's archive's, read from here.
    """

    def __init__(
        self,
        client: TorchServeClient,
        model: str = MODEL_NAME,
        golden: GoldenRecord | None = None,
        interval: float = 1.0,
        golden_interval: float = 10.0,
        golden_max_age: float = GOLDEN_MAX_AGE,
        workers_timeout: float = 2.0,
        golden_timeout: float = 5.0,
        workers_grace: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        model_store: Path | None = None,
    ) -> None:
        self.client = client
        self.model_store = model_store
        self._golden_url: str | None = None  # the archive the golden record is from, once known
        self.model = model
        self.golden = golden
        self.interval = interval
        self.golden_interval = golden_interval
        self.golden_max_age = golden_max_age
        self.workers_timeout = workers_timeout
        self.workers_grace = workers_grace
        self._answered_at = float("-inf")  # when the worker check last had TorchServe's answer
        self.golden_timeout = golden_timeout
        self.clock = clock
        self.state = HealthState()
        self._golden_at = float("-inf")
        self._workers_at = float("-inf")
        self._good_at = float("-inf")  # when the last good golden verdict's request was sent
        self._lock = threading.Lock()
        self._golden_thread: threading.Thread | None = None
        self._generation = 0  # golden answers to requests sent before the workers were lost are dropped

    def check(self, now: float | None = None) -> HealthState:
        """Run the worker check if due, start the golden check if due; returns the current state."""
        now = self.clock() if now is None else now
        if now - self._workers_at >= self.interval:
            self._workers_at = now
            self._check_workers()
        with self._lock:
            if not self.state.up:
                self._generation += 1
                self.state.golden_ok = None  # check again as soon as a worker is back
                self._golden_at = self._good_at = float("-inf")
            elif now - self._golden_at >= self.golden_interval and not self._golden_running():
                self._golden_at = now
                self._golden_thread = threading.Thread(
                    target=self._check_golden, args=(now, self._generation), name="golden-check", daemon=True
                )
                self._golden_thread.start()
        return self.state

    def wait_golden(self, timeout: float | None = None) -> None:
        """Wait until the golden check in flight (if any) has its verdict."""
        thread = self._golden_thread
        if thread is not None:
            thread.join(timeout)

    def _golden_running(self) -> bool:
        return self._golden_thread is not None and self._golden_thread.is_alive()

    def _check_workers(self) -> None:
        now = self.clock()
        try:
            version = self.client.default_version(self.model, timeout=self.workers_timeout)
        except requests.Timeout as err:
            if now - self._answered_at > self.workers_grace:
                log.warning("worker check: no answer for %.0f s (%s): no READY worker", now - self._answered_at, err)
                self.state.ready_workers = 0
            else:
                log.info("worker check: no answer in time (%s); the last count holds", err)
        except (requests.RequestException, ManagementError, ValueError) as err:
            log.debug("worker check: no answer (%s)", err)
            self.state.ready_workers = 0  # expected_workers: the last known
        else:
            self._answered_at = now
            self._follow_default(version.get("modelUrl"))
            self.state.ready_workers = count_ready(version)
            min_workers = version.get("minWorkers")
            self.state.expected_workers = min_workers if isinstance(min_workers, int) else None
        self.state.checked_at = time.time()

    def _follow_default(self, url: object) -> None:
        """Take the golden record of the default version's archive when the default changed to
        another archive (a promoted rollout), and check it at once."""
        if not isinstance(url, str) or self.model_store is None:
            return
        if self._golden_url is None:
            self._golden_url = url  # the archive the stack started with: its record is the one given
            return
        if url == self._golden_url:
            return
        try:
            golden = GoldenRecord.from_archive(Path(self.model_store) / url)
        except (GoldenError, OSError) as err:
            log.error("readiness: the default version's archive %s has no golden record (%s)", url, err)
            golden = None
        with self._lock:
            self.golden, self._golden_url = golden, url
            self._golden_at = float("-inf")  # judge the new default's answers at the next check
        log.info("readiness: the default version is now %s; golden record from it", url)

    def _golden_answer(self) -> tuple[bool | None, str]:
        """(verdict, what was seen); verdict None: no verdict (busy, no answer). Every text of the
        record is sent; the first that shows a broken model decides."""
        if self.golden is None:
            return False, "the served archive has no golden record (rebuild it: make archive)"
        for index, text in enumerate(self.golden.texts):
            try:
                response = self.client.predict(text, self.model, timeout=self.golden_timeout, probe=True)
            except requests.RequestException as err:
                return None, f"no answer ({err})"
            if response.status_code in BUSY:
                return None, f"TorchServe is busy ({response.status_code})"
            if response.status_code == 400 and "Token Auth" in response.text:
                # TorchServe has just issued a new inference key (the old one is invalid at once) and
                # the request went out with the old one: no verdict on the model.
                return None, "TorchServe refused the key it has just replaced"
            if response.status_code != 200:
                return False, f"golden text {index}: {response.status_code} {response.text[:200]}"
            try:
                answer = response.json()
            except ValueError:
                return False, f"golden text {index}: the answer is not JSON"
            why = judge(self.golden, index, answer)
            if why is not None:
                return False, f"golden text {index} ({text!r}): {why}"
        return True, f"{len(self.golden.texts)} golden answers within {self.golden.tolerance} of the archive's"

    def _check_golden(self, sent: float, generation: int) -> None:
        try:
            ok, seen = self._golden_answer()
        except Exception as err:  # the thread must leave a verdict (or none) in any case
            log.exception("golden check raised")
            ok, seen = None, f"error ({err})"
        with self._lock:
            if generation != self._generation:
                return  # the workers were lost since: the verdict is out of date
            if ok is None:
                age = sent - self._good_at
                if self.state.golden_ok and age >= self.golden_max_age:
                    log.error(
                        "golden check: %s; the last good verdict is %.0f s old (golden_max_age %.0f s): not ready",
                        seen,
                        age,
                        self.golden_max_age,
                    )
                    self.state.golden_ok, self.state.golden_seen = False, seen
                else:
                    log.info("golden check: %s; keeping the last verdict", seen)
                return
            if not ok:
                log.error("golden check failed: %s", seen)
            else:
                if not self.state.golden_ok:
                    log.info("golden check passed: %s", seen)  # first good verdict, or again after a bad one
                self._good_at = sent
            self.state.golden_ok, self.state.golden_seen = ok, seen


class Liveness:
    """Whether the service should be restarted, from the readiness verdicts it is shown.

    Once the service has been ready, it fails when it has then been not ready (no READY worker,
    or the golden check failing) continuously for longer than ``limit`` seconds. Before it has
    ever been ready, startup is left to the start timeouts. Time does not count while ``paused``
    (a deliberate drain or shutdown), nor while the served version's configured minimum of
    workers is 0 (an operator scaled it to zero through the management API: no worker is
    expected, and restarting would undo the operator's decision).

    Args:
        limit: Seconds (0: never fail).
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(self, limit: float = UNREADY_EXIT, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.was_ready = False
        self.unready_since: float | None = None

    def failure(self, state: HealthState, paused: bool = False, now: float | None = None) -> str | None:
        """Why the service should be restarted now, or None."""
        now = self.clock() if now is None else now
        if state.ready:
            self.was_ready, self.unready_since = True, None
            return None
        if paused or not self.was_ready or self.limit <= 0 or state.expected_workers == 0:
            self.unready_since = None
            return None
        if self.unready_since is None:
            self.unready_since = now
        elapsed = now - self.unready_since
        if elapsed <= self.limit:
            return None
        why = "no READY worker" if not state.up else "the golden check has no good verdict"
        return f"not ready for {elapsed:.0f} s after having been ready ({why}; limit {self.limit:.0f} s)"
