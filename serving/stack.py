"""The service as one unit: TorchServe behind the gateway, watched by a supervisor.

:class:`Stack` (run by ``python -m serving run``: ``serving/__main__.py``) starts TorchServe (from
``config.properties``), then the nginx gateway in front of it, and supervises both until stopped:

* readiness (``serving.health``): the gateway's ``/ready`` and prediction route follow it;
* keys: clients hold gateway keys (``serving.keys``), applied on change without a restart;
  TorchServe's inference key is passed upstream and followed through restarts and rotations,
  and renewed through TorchServe's token API before it expires. TorchServe holds one inference
  key, so a request forwarded with the old one after a change would fail: the prediction route
  is closed (a retryable 503 NotReady) from before the renewal until nginx's new workers, which
  hold the new key, have taken over;
* liveness: once ready, a service that stays not ready for longer than ``--unready-exit``
  seconds ends ``run`` with exit code 1 (``serving.health.Liveness``), so that its container is
  restarted;
* the access log is counted into the gateway's metrics and rotated by size;
* ``POST /feedback`` (``serving.feedback_service``, a process of its own at the lowest CPU
  priority, started again if it exits): labels for served answers, joined to them in SQLite, and
  the live quality they give on the gateway's metrics;
* on SIGTERM, readiness drops first, requests keep being served for ``drain`` seconds (load
  balancers stop sending) and every answer closes its connection (clients on kept-alive
  connections reconnect, to another replica), then nginx finishes what is in flight, then
  TorchServe stops.

"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

from project import MODEL_NAME, SERVE_DIR, SERVED_MODELS
from serving import feedback as feedback_store
from serving import keys as gateway_keys
from serving import rollout
from serving.access_log import AccessLog
from serving.client import key_expiry
from serving.explain import ExplainProcess
from serving.feedback_service import FeedbackProcess
from serving.gateway import RELOAD_TIMEOUT, Gateway, nginx_workers, wait_reloaded
from serving.golden import GoldenRecord, archive_of, served_record
from serving.health import GOLDEN_MAX_AGE, UNREADY_EXIT, Liveness, Readiness
from serving.server import TorchServe, free_port
from serving.settings import GatewaySettings

log = logging.getLogger("serving.stack")

# Seconds between the supervisor's rounds of key reloads, access-log reading and metrics writing.
HOUSEKEEPING_INTERVAL = 1.0

# Seconds the prediction route stays closed at least before TorchServe's inference key is replaced,
# so that requests that have just passed the route's check reach TorchServe while the old key holds.
KEY_SWITCH_SETTLE = 0.1
# Seconds the switch waits at most, with the route closed, for the requests in flight to be answered:
# a request still in flight when the key changes would be retried (worker died, timeout) with the
# old key, which TorchServe refuses. Past this the key is switched anyway (logged).
KEY_SWITCH_DRAIN = 10.0
# Seconds before a failed renewal of TorchServe's inference key is tried again.
RENEWAL_RETRY = 60.0


def pid_file(workdir: Path = SERVE_DIR) -> Path:
    """The pid file of a stack started in the background (``python -m serving start``) in ``workdir``."""
    return Path(workdir).resolve() / "stack.pid"


class Stack:
    """TorchServe plus the gateway plus their supervisor, under one work folder.

    Args:
        model_store: Folder holding the archives.
        workdir: Folder for TorchServe's and nginx's files, the keys file and the logs.
        gateway: The gateway's settings.
        models: TorchServe's ``--models`` argument.
        model: The model the gateway checks and serves.
        keys_file: Gateway keys (created with one key if missing); None: no key needed.
        free_ports: TorchServe on free loopback ports instead of ``config.properties``' addresses.
        ts_overrides: Properties that replace ``config.properties`` values.
        golden: The readiness check's golden record (``serving.golden``); None: the one packed in
            the archive that serves ``model``. Without a record the service is never ready.
        drain: Seconds between readiness dropping and the gateway stopping.
        tick: Seconds between supervisor rounds (health checks; see ``HOUSEKEEPING_INTERVAL``).
        key_renewal: Share of the TorchServe key's lifetime left when it is renewed.
        golden_max_age: Seconds a good golden verdict is kept while golden checks get no verdict
            (``serving.health.GOLDEN_MAX_AGE``).
        unready_exit: Seconds of not being ready, after having been ready, before
            :meth:`liveness_failure` asks for a restart (``serving.health.UNREADY_EXIT``; 0: never).
        feedback_db: The feedback store (``serving.feedback``; default ``<workdir>/feedback.sqlite``).
        feedback_retention_days: Days an answer may get its label.
        quality_window: Labelled answers per model version the live quality metrics cover.
        feedback_items_per_s: Labels the feedback service handles per second at most.
        feedback: Serve ``POST /feedback`` (needs the golden record, for the label names).
    """

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        gateway: GatewaySettings | None = None,
        models: str = SERVED_MODELS,
        model: str = MODEL_NAME,
        keys_file: Path | None = None,
        free_ports: bool = False,
        ts_overrides: dict[str, str] | None = None,
        golden: GoldenRecord | None = None,
        drain: float = 2.0,
        tick: float = 0.25,
        key_renewal: float = 0.1,
        golden_max_age: float = GOLDEN_MAX_AGE,
        unready_exit: float = UNREADY_EXIT,
        feedback_db: Path | None = None,
        feedback_retention_days: float = feedback_store.RETENTION_DAYS,
        quality_window: int = feedback_store.QUALITY_WINDOW,
        feedback_items_per_s: float = feedback_store.ITEMS_PER_S,
        feedback: bool = True,
        explain: bool = True,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.model = model
        self.keys_file = keys_file
        # Re-reads the gateway keys only when the file changed or a key expired (refresh: SIGHUP).
        self.key_watcher = gateway_keys.KeyWatcher(keys_file) if keys_file is not None else None
        self.drain = drain
        self.tick = tick
        self.key_renewal = key_renewal
        self.torchserve = TorchServe(model_store, self.workdir / "torchserve", models, ts_overrides, free_ports)
        upstream = self.torchserve.inference_url.split("//", 1)[-1]
        if golden is None:
            golden, source = served_record(model_store, models, model)
            if golden is None:
                log.error("readiness: no golden record (%s): the service will not report ready", source)
        # The label names of POST /feedback: the served archive's (its golden record's).
        self.feedback_labels = list(golden.probabilities[0]) if golden is not None and feedback else None
        self.feedback_db = Path(feedback_db) if feedback_db else self.workdir / "feedback.sqlite"
        self.feedback_retention_days = feedback_retention_days
        self.feedback_items_per_s = feedback_items_per_s
        self.quality_window = quality_window
        self.feedback: FeedbackProcess | None = None
        self._feedback_port = free_port() if self.feedback_labels else None
        # POST /explanations/<model>: the served archive's handler in a process of its own.
        archive = archive_of(models, model)
        self.explain_archive = Path(model_store) / archive if explain and archive else None
        self.explainer: ExplainProcess | None = None
        self._explain_port = free_port() if self.explain_archive is not None else None
        # The gateway maps TorchServe's 404 on this model's route to a retryable 503 NotReady.
        gateway = dataclasses.replace(
            gateway or GatewaySettings(),
            model=model,
            feedback_port=self._feedback_port,
            explain_port=self._explain_port,
        )
        self.gateway = Gateway(upstream, self.workdir / "gateway", gateway)
        self.readiness = Readiness(
            self.torchserve.client, model, golden, golden_max_age=golden_max_age, model_store=Path(model_store)
        )
        self.liveness = Liveness(unready_exit)
        self.access_log = AccessLog(self.gateway.access_log)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._switching_key = threading.Event()
        self._renew_retry_at = float("-inf")
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The gateway."""
        return self.gateway.url

    def client_keys(self) -> list[str] | None:
        """The gateway keys valid now (None: keys are off, only with no keys file).

        A keys file that cannot be read keeps the keys in force, and where none is in force yet
        (at start) no key is valid: the gateway fails closed, never open.
        """
        if self.keys_file is None:
            return None
        try:
            return self.key_watcher.valid()
        except (OSError, ValueError) as err:
            log.error("gateway keys not reloaded: %s", err)
            current = self.gateway.client_keys
            return current if current is not None else []

    def headers(self) -> dict[str, str]:
        """An ``Authorization`` header with the newest gateway key (empty when keys are off)."""
        keys = self.client_keys()
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def start(self, timeout: float = 180) -> None:
        """Start TorchServe, then the gateway, then the supervisor; returns once both listen
        (not once the model is ready: see :meth:`wait_ready`)."""
        # A rollout this stack did not finish is over: it starts with no routes and one version.
        rollout.end_after_restart(self.workdir)
        if self.keys_file is not None:
            gateway_keys.ensure(self.keys_file)
        # The client keys are loaded before TorchServe starts (a file broken meanwhile cannot
        # leave the gateway without keys).
        self.gateway.client_keys = self.client_keys()
        self.torchserve.start(timeout=timeout, wait_model=None)
        if self._feedback_port is not None:
            self.feedback = FeedbackProcess(
                self.feedback_db,
                self.feedback_labels,
                self.torchserve.workdir / "logs",
                self._feedback_port,
                self.workdir / "feedback.log",
                self.feedback_retention_days,
                self.quality_window,
                self.feedback_items_per_s,
            )
            self.feedback.start()
        if self.explain_archive is not None and self.explain_archive.is_file():
            self.explainer = ExplainProcess(
                self.explain_archive, self._explain_port, self.workdir / "explain.log", self.model
            )
            self.explainer.start(timeout=None)  # ready when its model is loaded; 503 until then
        self.gateway.upstream_key = self.torchserve.keys.get("inference")
        self.gateway.start()
        self._stop.clear()
        self._draining.clear()
        self._thread = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 180) -> float:
        """Wait until the gateway's ``/ready`` answers 200; returns the seconds waited.

        Raises:
            TimeoutError: Not ready in time (the message says what the checks saw).
            RuntimeError: TorchServe exited.
        """
        return self.torchserve.process.wait_until(
            lambda: self.readiness.state.ready, timeout, f"ready (health: {self.readiness.state})"
        )

    def supervise_once(self, housekeeping: bool = True) -> None:
        """One supervisor round: health; with ``housekeeping`` also keys, access log and metrics."""
        state = self.readiness.check()
        self._set_health()
        if not housekeeping:
            return
        if self._torchserve_key_due():
            self._switch_torchserve_key(renew=True)
        elif self.torchserve.keys.get("inference") != self.gateway.upstream_key:
            self._switch_torchserve_key(renew=False)  # TorchServe restarted, or an operator renewed it
        else:
            self.gateway.update_keys(self.client_keys(), self.gateway.upstream_key)
        self.access_log.poll()
        if self.access_log.rotate_if_needed():
            self.gateway.reopen_logs()
        metrics = self.access_log.metrics(state.ready, state.up, state.ready_workers)
        if self.feedback is not None:
            if not self.feedback.process.running():
                log.error("the feedback service exited (see %s): starting it again", self.workdir / "feedback.log")
                self.feedback.start(timeout=None)
            metrics += self.feedback.metrics()  # the live quality, on the gateway's metrics endpoint
        if self.explainer is not None and self.explainer.due_for_restart():
            log.error("the explanation service exited (see %s): starting it again", self.workdir / "explain.log")
            self.explainer.start(timeout=None)
        tmp = self.gateway.workdir / "metrics.prom.tmp"
        tmp.write_text(metrics)
        os.replace(tmp, self.gateway.workdir / "metrics.prom")

    def _supervise(self) -> None:
        # Health every tick (a dead model is refused within a fraction of a second); key files,
        # the access log and the metrics file at most once per HOUSEKEEPING_INTERVAL.
        last = float("-inf")
        while not self._stop.is_set():
            now = time.monotonic()
            housekeeping = now - last >= HOUSEKEEPING_INTERVAL
            try:
                self.supervise_once(housekeeping)
            except Exception:  # the supervisor must outlive any one failed round
                log.exception("supervisor round failed")
            if housekeeping:
                last = now
            self._stop.wait(self.tick)

    def _set_health(self) -> None:
        """Open or close the prediction route and ``/ready`` from the last verdicts; both stay
        closed while TorchServe's key is being switched, ``/ready`` also while draining."""
        state = self.readiness.state
        closed = self._switching_key.is_set()
        ready = state.ready and not closed and not self._draining.is_set()
        self.gateway.set_health(up=state.up and not closed, ready=ready)

    def _torchserve_key_due(self) -> bool:
        """Whether TorchServe's inference key is near enough its expiry to be renewed."""
        key_file = self.torchserve.client.key_file
        if key_file is None or time.monotonic() < self._renew_retry_at:
            return False
        expires = key_expiry(key_file, "inference")
        if expires is None:
            return False
        lifetime = 60 * float(self.torchserve.props.get("token_expiration_min", 60))
        if expires - time.time() < self.key_renewal * lifetime:
            log.info("renewing TorchServe's inference key (it expires in %.0f s)", expires - time.time())
            return True
        return False

    def _wait_in_flight(self, timeout: float) -> None:
        """Wait until the gateway handles no request (or for ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while (busy := self.gateway.requests_in_flight()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if busy:
            log.warning("switching TorchServe's key with %d request(s) still in flight after %.0f s", busy, timeout)

    def _switch_torchserve_key(self, renew: bool) -> None:
        """Hand nginx TorchServe's current inference key (with ``renew``, first have TorchServe
        issue a new one through its token API) with the prediction route closed: TorchServe
        accepts only its newest key, and nginx's old workers forward the old one until its new
        workers, started by the reload, have taken over. Reopens once they have."""
        self._switching_key.set()
        try:
            self._set_health()
            if renew:
                time.sleep(KEY_SWITCH_SETTLE)
                self._wait_in_flight(KEY_SWITCH_DRAIN)
                try:
                    self.torchserve.client.rotate_key("inference")
                except Exception:
                    # Not again at once: each try closes the route for a moment.
                    self._renew_retry_at = time.monotonic() + RENEWAL_RETRY
                    raise
            before = set(nginx_workers(self.gateway))
            changed = self.gateway.update_keys(self.client_keys(), self.torchserve.keys.get("inference"))
            if changed and self.gateway.process is not None and not wait_reloaded(self.gateway, before):
                log.warning("nginx did not reload within %.0f s; reopening the prediction route", RELOAD_TIMEOUT)
        finally:
            self._switching_key.clear()
            self._set_health()

    def liveness_failure(self) -> str | None:
        """Why the service should be restarted now (see :class:`serving.health.Liveness`), or None;
        never while draining."""
        return self.liveness.failure(self.readiness.state, paused=self._draining.is_set())

    def stop(self) -> None:
        """Drop readiness, drain (answers close their connections), stop the gateway gracefully,
        then TorchServe; safe to call twice."""
        if self._thread is not None:
            self._draining.set()
            self._set_health()
            try:
                self.gateway.drain()
            except OSError as err:  # the stop goes on: the drain's Connection: close is a courtesy
                log.warning("could not switch the gateway to closing connections: %s", err)
            time.sleep(self.drain)
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self.gateway.stop()
        if self.feedback is not None:
            self.feedback.stop()
            self.feedback = None
        if self.explainer is not None:
            self.explainer.stop()
            self.explainer = None
        self.torchserve.stop()
        self.access_log.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
