"""The service as one unit: TorchServe behind the gateway, watched by a supervisor.

``python -m serving.stack run`` starts TorchServe (from ``config.properties``), then the nginx
gateway in front of it, and supervises both in the foreground until SIGTERM or SIGINT:

* readiness (``serving.health``): the gateway's ``/ready`` and prediction route follow it;
* keys: clients hold front-door keys (``serving.keys``), applied on change without a restart;
  TorchServe's inference key is passed upstream and followed through restarts and rotations,
  and renewed through TorchServe's token API before it expires;
* the access log is counted into the gateway's metrics and rotated by size;
* on SIGTERM, readiness drops first, requests keep being served for ``drain`` seconds (load
  balancers stop sending), then nginx finishes what is in flight, then TorchServe stops.

``start`` runs the same in the background (``make serve``) and waits until it is ready; ``stop``
stops it (``make stop``) and leaves no process; ``key`` prints a front-door key; ``rotate-key``
adds a new one and keeps the old ones valid for a grace period; ``torchserve-key management``
prints TorchServe's management key for operators on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
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

import requests

from project import PROJECT_ROOT
from serving import keys as frontdoor_keys
from serving.access_log import AccessLog
from serving.client import read_keys
from serving.gateway import Gateway, GatewaySettings
from serving.health import GOLDEN_LABEL, GOLDEN_TEXT, Readiness
from serving.server import TorchServe

log = logging.getLogger("serving.stack")

# Seconds between the supervisor's rounds of key reloads, access-log reading and metrics writing.
HOUSEKEEPING_INTERVAL = 1.0

WORKDIR = PROJECT_ROOT / "outputs" / "serve"


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
        golden: The readiness check's text and expected label.
        drain: Seconds between readiness dropping and the gateway stopping.
        tick: Seconds between supervisor rounds (health checks; see ``HOUSEKEEPING_INTERVAL``).
        key_renewal: Share of the TorchServe key's lifetime left when it is renewed.
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
        golden: tuple[str, str] = (GOLDEN_TEXT, GOLDEN_LABEL),
        drain: float = 2.0,
        tick: float = 0.25,
        key_renewal: float = 0.1,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.model = model
        self.keys_file = keys_file
        self.drain = drain
        self.tick = tick
        self.key_renewal = key_renewal
        self.torchserve = TorchServe(model_store, self.workdir / "torchserve", models, ts_overrides, free_ports)
        upstream = self.torchserve.inference_url.split("//", 1)[-1]
        self.gateway = Gateway(upstream, self.workdir / "gateway", gateway)
        self.readiness = Readiness(self.torchserve.client, model, *golden)
        self.access_log = AccessLog(self.gateway.access_log)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The front door."""
        return self.gateway.url

    def client_keys(self) -> list[str] | None:
        """The front-door keys valid now (None: keys are off)."""
        if self.keys_file is None:
            return None
        try:
            return frontdoor_keys.valid_keys(self.keys_file)
        except (OSError, ValueError) as err:  # keep the keys in force rather than lock everyone out
            log.error("front-door keys not reloaded: %s", err)
            return self.gateway.client_keys

    def headers(self) -> dict[str, str]:
        """An ``Authorization`` header with the newest front-door key (empty when keys are off)."""
        keys = self.client_keys()
        return {"Authorization": f"Bearer {keys[0]}"} if keys else {}

    def start(self, timeout: float = 180) -> None:
        """Start TorchServe, then the gateway, then the supervisor; returns once both listen
        (not once the model is ready: see :meth:`wait_ready`)."""
        if self.keys_file is not None:
            frontdoor_keys.ensure(self.keys_file)
        self.torchserve.start(timeout=timeout, wait_model=None)
        self.gateway.client_keys = self.client_keys()
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
        self.gateway.set_health(up=state.up, ready=state.ready and not self._draining.is_set())
        if not housekeeping:
            return
        self._renew_torchserve_key()
        self.gateway.update_keys(self.client_keys(), self.torchserve.keys.get("inference"))
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

    def _renew_torchserve_key(self) -> None:
        """Renew TorchServe's inference key through its token API before it expires."""
        key_file = self.torchserve.client.key_file
        if key_file is None or not key_file.exists():
            return
        try:
            entry = json.loads(key_file.read_text())["inference"]
            expires = datetime.fromisoformat(entry["expiration time"].replace("Z", "+00:00")).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return
        lifetime = 60 * float(self.torchserve.props.get("token_expiration_min", 60))
        if expires - time.time() < self.key_renewal * lifetime:
            log.info("renewing TorchServe's inference key (it expires in %.0f s)", expires - time.time())
            self.torchserve.client.rotate_key("inference")

    def stop(self) -> None:
        """Drop readiness, drain, stop the gateway gracefully, then TorchServe; safe to call twice."""
        if self._thread is not None:
            self._draining.set()
            self.gateway.set_health(up=self.readiness.state.up, ready=False)
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
    )


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
        golden=(args.golden_text, args.golden_label),
        drain=args.drain,
    )
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        stack.start()
        log.info("front door on %s:%d -> TorchServe %s", args.host, args.port, stack.torchserve.inference_url)
        while not stopping.wait(0.5):
            if not stack.torchserve.process.running():
                log.error("TorchServe exited:\n%s", stack.torchserve.log_tail())
                return 1
    finally:
        log.info("stopping: readiness down, draining for %.0f s", args.drain)
        stack.stop()
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
    parser.add_argument("--golden-text", default=GOLDEN_TEXT, help="readiness: a text whose label is known")
    parser.add_argument("--golden-label", default=GOLDEN_LABEL, help="readiness: the label it must get")
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
