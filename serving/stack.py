"""The service as one unit: TorchServe behind the gateway, watched by a supervisor.

``python -m serving.stack run`` starts TorchServe (from ``config.properties``), then the nginx
gateway in front of it, and supervises both in the foreground until SIGTERM or SIGINT:

* readiness (``serving.health``): the gateway's ``/ready`` and prediction route follow it;
* keys: clients hold front-door keys (``serving.keys``), applied on change without a restart;
  TorchServe's inference key is passed upstream and followed through restarts and rotations,
  and renewed through TorchServe's token API before it expires. TorchServe holds one inference
  key, so a request forwarded with the old one after a change would fail: the prediction route
  is closed (a retryable 503 NotReady) from before the renewal until nginx's new workers, which
  hold the new key, have taken over;
* liveness: once ready, a service that stays not ready for longer than ``--unready-exit``
  seconds ends ``run`` with exit code 1 (``serving.health.Liveness``), so that its container is
  restarted;
* the access log is counted into the gateway's metrics and rotated by size;
* on SIGTERM, readiness drops first, requests keep being served for ``drain`` seconds (load
  balancers stop sending) and every answer closes its connection (clients on kept-alive
  connections reconnect, to another replica), then nginx finishes what is in flight, then
  TorchServe stops.

``start`` runs the same in the background (``make serve``) and waits until it is ready; ``stop``
stops it (``make stop``) and leaves no process; ``key`` prints a front-door key; ``rotate-key``
adds a new one and keeps the old ones valid for a grace period; ``torchserve-key management``
prints TorchServe's management key for operators on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil
import requests

from project import PROJECT_ROOT, SERVE_DIR
from serving import keys as frontdoor_keys
from serving.access_log import AccessLog
from serving.client import read_keys
from serving.gateway import Gateway, GatewaySettings
from serving.golden import GoldenError, GoldenRecord, served_record
from serving.health import GOLDEN_MAX_AGE, UNREADY_EXIT, Liveness, Readiness
from serving.server import TorchServe

log = logging.getLogger("serving.stack")

# Seconds between the supervisor's rounds of key reloads, access-log reading and metrics writing.
HOUSEKEEPING_INTERVAL = 1.0

# Seconds the prediction route stays closed before TorchServe's inference key is replaced, so that
# requests that have just passed the route's check reach TorchServe while the old key still holds.
KEY_SWITCH_SETTLE = 0.1
# Seconds to wait for nginx's new workers after a reload; the route reopens then in any case.
RELOAD_TIMEOUT = 5.0
# Seconds before a failed renewal of TorchServe's inference key is tried again.
RENEWAL_RETRY = 60.0

WORKDIR = SERVE_DIR


def nginx_workers(gateway: Gateway) -> dict[int, str]:
    """The gateway's nginx worker processes by pid, with their titles (empty when it is not running)."""
    if gateway.process is None or gateway.process.pid is None:
        return {}
    try:
        children = psutil.Process(gateway.process.pid).children()
    except psutil.Error:
        return {}
    workers = {}
    for child in children:
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline()).strip()
            if "worker process" in title:
                workers[child.pid] = title
    return workers


def wait_reloaded(gateway: Gateway, before: set[int], timeout: float = RELOAD_TIMEOUT) -> bool:
    """Wait until nginx has taken a reload: a worker not in ``before`` (the pids before the reload)
    runs, and every worker of ``before`` has gone or is shutting down (it accepts nothing new).
    Returns False after ``timeout`` seconds (nginx kept its old config, or is not running)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = nginx_workers(gateway)
        new = any(pid not in before and "shutting down" not in title for pid, title in workers.items())
        old = any(pid in before and "shutting down" not in title for pid, title in workers.items())
        if new and not old:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


class Stack:
    """TorchServe plus the gateway plus their supervisor, under one work folder.

    Args:
        model_store: Folder holding the archives.
        workdir: Folder for TorchServe's and nginx's files, the keys file and the logs.
        gateway: The front door's settings.
        models: TorchServe's ``--models`` argument.
        model: The model the front door checks and serves.
        keys_file: Front-door keys (created with one key if missing); None: no key needed.
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
    """

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        gateway: GatewaySettings | None = None,
        models: str = "emotion=emotion.mar",
        model: str = "emotion",
        keys_file: Path | None = None,
        free_ports: bool = False,
        ts_overrides: dict[str, str] | None = None,
        golden: GoldenRecord | None = None,
        drain: float = 2.0,
        tick: float = 0.25,
        key_renewal: float = 0.1,
        golden_max_age: float = GOLDEN_MAX_AGE,
        unready_exit: float = UNREADY_EXIT,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.model = model
        self.keys_file = keys_file
        self.drain = drain
        self.tick = tick
        self.key_renewal = key_renewal
        self.torchserve = TorchServe(model_store, self.workdir / "torchserve", models, ts_overrides, free_ports)
        upstream = self.torchserve.inference_url.split("//", 1)[-1]
        # The front door maps TorchServe's 404 on this model's route to a retryable 503 NotReady.
        gateway = dataclasses.replace(gateway or GatewaySettings(), model=model)
        self.gateway = Gateway(upstream, self.workdir / "gateway", gateway)
        if golden is None:
            golden, source = served_record(model_store, models, model)
            if golden is None:
                log.error("readiness: no golden record (%s): the service will not report ready", source)
        self.readiness = Readiness(self.torchserve.client, model, golden, golden_max_age=golden_max_age)
        self.liveness = Liveness(unready_exit)
        self.access_log = AccessLog(self.gateway.access_log)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._switching_key = threading.Event()
        self._renew_retry_at = float("-inf")
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The front door."""
        return self.gateway.url

    def client_keys(self) -> list[str] | None:
        """The front-door keys valid now (None: keys are off, only with no keys file).

        A keys file that cannot be read keeps the keys in force, and where none is in force yet
        (at start) no key is valid: the front door fails closed, never open.
        """
        if self.keys_file is None:
            return None
        try:
            return frontdoor_keys.valid_keys(self.keys_file)
        except (OSError, ValueError) as err:
            log.error("front-door keys not reloaded: %s", err)
            current = self.gateway.client_keys
            return current if current is not None else []

    def headers(self) -> dict[str, str]:
        """An ``Authorization`` header with the newest front-door key (empty when keys are off)."""
        keys = self.client_keys()
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def start(self, timeout: float = 180) -> None:
        """Start TorchServe, then the gateway, then the supervisor; returns once both listen
        (not once the model is ready: see :meth:`wait_ready`)."""
        if self.keys_file is not None:
            frontdoor_keys.ensure(self.keys_file)
        # The client keys are loaded before TorchServe starts (a file broken meanwhile cannot
        # leave the front door without keys).
        self.gateway.client_keys = self.client_keys()
        self.torchserve.start(timeout=timeout, wait_model=None)
        self.gateway.upstream_key = self.torchserve.keys.get("inference")
        self.gateway.start()
        self._stop.clear()
        self._draining.clear()
        self._thread = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 180) -> float:
        """Wait until the front door's ``/ready`` answers 200; returns the seconds waited.

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
        if key_file is None or not key_file.exists() or time.monotonic() < self._renew_retry_at:
            return False
        try:
            entry = json.loads(key_file.read_text())["inference"]
            expires = datetime.fromisoformat(entry["expiration time"].replace("Z", "+00:00")).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return False
        lifetime = 60 * float(self.torchserve.props.get("token_expiration_min", 60))
        if expires - time.time() < self.key_renewal * lifetime:
            log.info("renewing TorchServe's inference key (it expires in %.0f s)", expires - time.time())
            return True
        return False

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
                log.warning("could not switch the front door to closing connections: %s", err)
            time.sleep(self.drain)
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self.gateway.stop()
        self.torchserve.stop()
        self.access_log.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _settings(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        tries=args.tries,
        attempt_timeout=args.attempt_timeout,
        rate=args.rate,
        burst=args.burst,
        connections=args.connections,
        trusted_proxies=tuple(args.trusted_proxy),
    )


def _golden(path: Path | None) -> GoldenRecord | None:
    if path is None:
        return None
    try:
        return GoldenRecord.from_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, GoldenError) as err:
        raise SystemExit(f"--golden-file: {err}") from err


def run(args: argparse.Namespace) -> int:
    """Run the stack in the foreground until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keys_file = None if args.no_keys else args.keys_file
    stack = Stack(
        args.model_store,
        args.workdir,
        _settings(args),
        models=args.models,
        keys_file=keys_file,
        free_ports=args.ts_free_ports,
        golden=_golden(args.golden_file),
        drain=args.drain,
        golden_max_age=args.golden_max_age,
        unready_exit=args.unready_exit,
    )
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        stack.start()
        log.info("front door on %s:%d -> TorchServe %s", args.host, args.port, stack.torchserve.inference_url)
        return watch(stack, stopping)
    finally:
        log.info("stopping: readiness down, draining for %.0f s", args.drain)
        stack.stop()


def watch(stack: Stack, stopping: threading.Event, poll: float = 0.5) -> int:
    """Wait for ``stopping`` (SIGTERM, SIGINT): 0. Exit code 1 when TorchServe or nginx exits, or
    when the service, once ready, has been not ready for longer than the stack's ``unready_exit``."""
    while not stopping.wait(poll):
        if not stack.torchserve.process.running():
            log.error("TorchServe exited:\n%s", stack.torchserve.log_tail())
            return 1
        if stack.gateway.process is not None and not stack.gateway.process.running():
            log.error("the front door (nginx) exited: see %s", stack.gateway.workdir / "nginx.out")
            return 1
        failure = stack.liveness_failure()
        if failure:
            log.error("exiting so that the service is restarted: %s (health: %s)", failure, stack.readiness.state)
            return 1
    return 0


def _pid_file(workdir: Path) -> Path:
    return workdir / "stack.pid"


def _running_pid(workdir: Path) -> int | None:
    try:
        pid = int(_pid_file(workdir).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start(args: argparse.Namespace) -> int:
    """Start ``run`` in the background and wait until the front door is ready."""
    workdir = args.workdir.resolve()
    if _running_pid(workdir):
        print(f"already running (pid {_running_pid(workdir)}); `make stop` first", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [a for a in args.argv if a != "start"]
    log_path = workdir / "stack.log"
    with log_path.open("ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "serving.stack", "run", *argv],
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _pid_file(workdir).write_text(str(child.pid))
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"the stack exited with code {child.returncode}; see {log_path}", file=sys.stderr)
            return 1
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        time.sleep(0.5)
    else:
        print(f"not ready after {args.timeout:.0f} s; see {log_path} and {workdir}/torchserve/logs", file=sys.stderr)
        return 1
    print(f"Ready: {url} (TorchServe behind it; logs in {workdir}). Try:\n")
    print("  KEY=$(.venv/bin/python -m serving.stack key)")
    print(
        "  curl -H \"Authorization: Bearer $KEY\" -H 'Content-Type: text/plain' \\\n"
        f"       --data 'i feel wonderful today' {url}/predictions/emotion\n"
    )
    print("Stop it with: make stop")
    return 0


def stop(args: argparse.Namespace) -> int:
    """Stop the stack that ``start`` began: SIGTERM, wait, then kill its whole session."""
    workdir = args.workdir.resolve()
    pid = _running_pid(workdir)
    if pid is None:
        print("not running")
        _pid_file(workdir).unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and _running_pid(workdir):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _pid_file(workdir).unlink(missing_ok=True)
    print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: ``run``, ``start``, ``stop``, ``key``, ``rotate-key``, ``torchserve-key [api]``."""
    parser = argparse.ArgumentParser(description="TorchServe behind the retrying gateway, supervised.")
    parser.add_argument("command", choices=["run", "start", "stop", "key", "rotate-key", "torchserve-key"])
    parser.add_argument("api", nargs="?", default="management", choices=["inference", "management", "API"])
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    parser.add_argument("--model-store", type=Path, default=PROJECT_ROOT / "model_store")
    parser.add_argument("--models", default="emotion=emotion.mar", help="TorchServe's --models")
    parser.add_argument("--ts-free-ports", action="store_true", help="TorchServe on free loopback ports")
    parser.add_argument("--keys-file", type=Path, default=None, help="front-door keys (default <workdir>/keys.json)")
    parser.add_argument("--no-keys", action="store_true", help="no front-door key (behind another authenticator)")
    parser.add_argument("--host", default="127.0.0.1", help="front-door address (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--metrics-port", type=int, default=8083)
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics port")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--attempt-timeout", type=int, default=None, help="default: responseTimeout")
    parser.add_argument("--rate", type=int, default=5000, help="requests/s per client address")
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=1024, help="connections per client address")
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        help="a proxy in front (address or network; repeatable) whose X-Forwarded-For names the client",
    )
    parser.add_argument(
        "--golden-file",
        type=Path,
        default=None,
        help="readiness: a golden.json to compare answers with (default: the one in the served archive)",
    )
    parser.add_argument(
        "--golden-max-age",
        type=float,
        default=GOLDEN_MAX_AGE,
        help="readiness: seconds a good golden verdict holds while golden checks get busy answers or none",
    )
    parser.add_argument(
        "--unready-exit",
        type=float,
        default=UNREADY_EXIT,
        help="run: exit 1 after this many seconds not ready, once it was ready (0: never)",
    )
    parser.add_argument("--drain", type=float, default=2.0, help="seconds between not-ready and stopping")
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--grace", type=float, default=3600, help="rotate-key: seconds the old keys stay valid")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.keys_file = args.keys_file or args.workdir / "keys.json"
    if args.command == "key":
        try:
            print(frontdoor_keys.valid_keys(args.keys_file)[0])
        except (OSError, ValueError, IndexError):
            print(f"no valid key in {args.keys_file}: start the service first (make serve)", file=sys.stderr)
            return 1
        return 0
    if args.command == "torchserve-key":  # for operators on this machine (management API)
        key = read_keys(args.workdir / "torchserve" / "key_file.json").get(args.api)
        if key is None:
            print("no TorchServe key file: start the service first (make serve)", file=sys.stderr)
            return 1
        print(key)
        return 0
    if args.command == "rotate-key":
        key = frontdoor_keys.rotate(args.keys_file, args.grace)
        print(key)
        print(f"(the other keys stay valid for {args.grace:.0f} s)", file=sys.stderr)
        return 0
    return {"run": run, "start": start, "stop": stop}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
