"""``python -m serving``: run, start, stop and key the service (``make serve``, ``make stop``).

* ``run`` starts the stack (``serving.stack``: TorchServe behind the gateway, supervised) in the
  foreground until SIGTERM or SIGINT; the image's entrypoint runs this.
* ``start`` runs ``run`` in the background (a :class:`serving.process.ManagedProcess` with a pid
  file in the work folder) and waits until ``/ready`` answers; ``stop`` stops it and leaves no
  process.
* ``key`` prints a gateway key for clients; ``rotate-key`` adds a new one and keeps the others
  valid for ``--grace`` seconds; ``torchserve-key [management|inference]`` prints TorchServe's own
  key for operators on the machine.

Every flag is a field of :class:`serving.settings.ServeSettings`, with its default and its
``EMOTION_SERVE_<FIELD>`` environment override.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path

import requests

from project import LOOPBACK, MODEL_NAME, PROJECT_ROOT
from serving import keys as gateway_keys
from serving.client import read_keys
from serving.golden import GoldenError, GoldenRecord
from serving.process import ManagedProcess
from serving.settings import ServeSettings, field_type
from serving.stack import Stack, pid_file

log = logging.getLogger("serving")

COMMANDS = ("run", "start", "stop", "key", "rotate-key", "torchserve-key")


def build_parser(defaults: ServeSettings | None = None) -> argparse.ArgumentParser:
    """The command line: one flag per field of ``defaults`` (default: ``ServeSettings.from_env()``)."""
    defaults = defaults or ServeSettings.from_env()
    parser = argparse.ArgumentParser(
        prog="python -m serving", description="Run, start, stop and key the service (make serve, make stop)."
    )
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("api", nargs="?", default="management", choices=["inference", "management", "API"])
    for item in dataclasses.fields(ServeSettings):
        flag, default = "--" + item.name.replace("_", "-"), getattr(defaults, item.name)
        kind, many = field_type(item)
        help_text = item.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
        elif many:
            parser.add_argument(flag, type=kind, action="append", default=list(default), help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    return parser


def settings_of(args: argparse.Namespace) -> ServeSettings:
    """The settings a parsed command line names."""
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(ServeSettings)}
    values["trusted_proxy"] = tuple(values["trusted_proxy"])
    settings = ServeSettings(**values)
    return dataclasses.replace(settings, keys_file=settings.keys_file or settings.workdir / "keys.json")


def _golden(path: Path | None) -> GoldenRecord | None:
    if path is None:
        return None
    try:
        return GoldenRecord.from_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, GoldenError) as err:
        raise SystemExit(f"--golden-file: {err}") from err


def run(settings: ServeSettings) -> int:
    """Run the stack in the foreground until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stack = Stack(
        settings.model_store,
        settings.workdir,
        settings.gateway(),
        models=settings.models,
        keys_file=None if settings.no_keys else settings.keys_file,
        free_ports=settings.ts_free_ports,
        golden=_golden(settings.golden_file),
        drain=settings.drain,
        golden_max_age=settings.golden_max_age,
        unready_exit=settings.unready_exit,
        feedback_db=settings.feedback_db,
        feedback_retention_days=settings.feedback_retention_days,
        quality_window=settings.quality_window,
        feedback_items_per_s=settings.feedback_items_per_s,
    )
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    if stack.key_watcher is not None:  # SIGHUP: read the gateway keys again now
        signal.signal(signal.SIGHUP, lambda *_: stack.key_watcher.refresh())
    try:
        stack.start()
        log.info("gateway on %s:%d -> TorchServe %s", settings.host, settings.port, stack.torchserve.inference_url)
        return watch(stack, stopping)
    finally:
        log.info("stopping: readiness down, draining for %.0f s", settings.drain)
        stack.stop()


def watch(stack: Stack, stopping: threading.Event, poll: float = 0.5) -> int:
    """Wait for ``stopping`` (SIGTERM, SIGINT): 0. Exit code 1 when TorchServe or nginx exits, or
    when the service, once ready, has been not ready for longer than the stack's ``unready_exit``."""
    while not stopping.wait(poll):
        if not stack.torchserve.process.running():
            log.error("TorchServe exited:\n%s", stack.torchserve.log_tail())
            return 1
        if stack.gateway.process is not None and not stack.gateway.process.running():
            log.error("the gateway (nginx) exited: see %s", stack.gateway.workdir / "nginx.out")
            return 1
        failure = stack.liveness_failure()
        if failure:
            log.error("exiting so that the service is restarted: %s (health: %s)", failure, stack.readiness.state)
            return 1
    return 0


def start(settings: ServeSettings, argv: list[str]) -> int:
    """Start ``run`` in the background and wait until the gateway is ready."""
    workdir = settings.workdir.resolve()
    if (pid := ManagedProcess.recorded(pid_file(workdir))) is not None:
        print(f"already running (pid {pid}); `make stop` first", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "stack.log"
    command = [sys.executable, "-m", "serving", "run", *(a for a in argv if a != "start")]
    child = ManagedProcess("the stack", command, log_path, cwd=PROJECT_ROOT, pid_file=pid_file(workdir))
    child.start()
    url = f"http://{LOOPBACK}:{settings.port}"

    def ready() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"{url}/ready", timeout=2).status_code == 200
        return False

    try:
        child.wait_until(ready, settings.timeout, "ready")
    except RuntimeError:
        print(f"the stack exited before it was ready; see {log_path}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(
            f"not ready after {settings.timeout:.0f} s; see {log_path} and {workdir}/torchserve/logs", file=sys.stderr
        )
        return 1
    print(f"Ready: {url} (TorchServe behind it; logs in {workdir}). Try:\n")
    print("  KEY=$(.venv/bin/python -m serving key)")
    print(
        "  curl -H \"Authorization: Bearer $KEY\" -H 'Content-Type: text/plain' \\\n"
        f"       --data 'i feel wonderful today' {url}/predictions/{MODEL_NAME}\n"
    )
    print("Stop it with: make stop")
    return 0


def stop(settings: ServeSettings) -> int:
    """Stop the stack that ``start`` began: SIGTERM, wait, then kill its whole session."""
    print("stopped" if ManagedProcess.stop_recorded(pid_file(settings.workdir), settings.timeout) else "not running")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: ``run``, ``start``, ``stop``, ``key``, ``rotate-key``, ``torchserve-key [api]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
    except ValueError as err:  # an EMOTION_SERVE_* override that is no value of its setting
        print(f"python -m serving: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        settings = settings_of(args)
    except ValueError as err:
        parser.error(str(err))
    if args.command == "key":
        try:
            print(gateway_keys.valid_keys(settings.keys_file)[0])
        except (OSError, ValueError, IndexError):
            print(f"no valid key in {settings.keys_file}: start the service first (make serve)", file=sys.stderr)
            return 1
        return 0
    if args.command == "torchserve-key":  # for operators on this machine (management API)
        key = read_keys(settings.workdir / "torchserve" / "key_file.json").get(args.api)
        if key is None:
            print("no TorchServe key file: start the service first (make serve)", file=sys.stderr)
            return 1
        print(key)
        return 0
    if args.command == "rotate-key":
        print(gateway_keys.rotate(settings.keys_file, settings.grace))
        print(f"(the other keys stay valid for {settings.grace:.0f} s)", file=sys.stderr)
        return 0
    if args.command == "start":
        return start(settings, argv)
    return {"run": run, "stop": stop}[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
