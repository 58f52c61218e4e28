"""Start, wait for and stop TorchServe.

:class:`TorchServe` runs a private server on free loopback ports in its own work
folder (tests, benchmarks). ``python -m serving.server wait`` waits for the server
that ``make serve`` started from the repository's ``config.properties`` and prints
how to call it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_PROPERTIES = PROJECT_ROOT / "config.properties"


def read_properties(path: Path) -> dict[str, str]:
    """Parse a Java-style ``key=value`` properties file (comments and blank lines skipped)."""
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def write_properties(path: Path, props: dict[str, str]) -> None:
    """Write ``key=value`` lines."""
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def absolute_log_config(vmargs: str) -> str:
    """``vmargs`` with a relative ``-Dlog4j.configurationFile`` made absolute from the repository root."""
    prefix = "-Dlog4j.configurationFile="
    parts = []
    for part in vmargs.split():
        if part.startswith(prefix) and not Path(part[len(prefix) :]).is_absolute():
            part = prefix + str(PROJECT_ROOT / part[len(prefix) :])
        parts.append(part)
    return " ".join(parts)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_keys(workdir: Path) -> dict[str, str]:
    """The inference and management keys from ``key_file.json`` (token authorization)."""
    path = workdir / "key_file.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return {}
    return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def auth_header(keys: dict[str, str], api: str) -> dict[str, str]:
    """``Authorization`` header for the ``inference`` or ``management`` API (empty without token auth)."""
    return {"Authorization": f"Bearer {keys[api]}"} if api in keys else {}


def wait_ready(
    inference: str, management: str, model: str | None, keys: dict[str, str], timeout: float, process=None
) -> float:
    """Poll ``/ping`` (and the model's worker status) until healthy; returns seconds waited.

    Raises:
        TimeoutError: Not ready within ``timeout`` seconds.
        RuntimeError: ``process`` exited while waiting.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {process.returncode} before becoming ready")
        try:
            ping = requests.get(f"{inference}/ping", headers=auth_header(keys, "inference"), timeout=2)
            ready = ping.status_code == 200 and ping.json().get("status") == "Healthy"
            if ready and model:
                status = requests.get(
                    f"{management}/models/{model}", headers=auth_header(keys, "management"), timeout=2
                )
                ready = status.status_code == 200 and any(
                    w.get("status") == "READY" for v in status.json() for w in v.get("workers", [])
                )
            if ready:
                return time.monotonic() - start
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"TorchServe at {inference} not ready after {timeout:.0f} s")


class TorchServe:
    """A TorchServe process on free 127.0.0.1 ports, isolated in ``workdir``.

    Args:
        model_store: Folder holding the archives.
        workdir: Folder for the derived config, logs, pid file and key file.
        models: ``--models`` argument, e.g. ``emotion=emotion.mar`` (None: start empty).
        overrides: Properties that replace the repository's ``config.properties`` values.
    """

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        models: str | None = "emotion=emotion.mar",
        overrides: dict[str, str] | None = None,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.models = models
        self.ports = {name: free_port() for name in ("inference", "management", "metrics")}
        self.props = read_properties(CONFIG_PROPERTIES)
        self.props.update(
            inference_address=f"http://127.0.0.1:{self.ports['inference']}",
            management_address=f"http://127.0.0.1:{self.ports['management']}",
            metrics_address=f"http://127.0.0.1:{self.ports['metrics']}",
            model_store=str(self.model_store),
            metrics_config=str(PROJECT_ROOT / self.props.get("metrics_config", "monitoring/metrics.yaml")),
            # Workers talk to the front end over /tmp/.ts.sock.<port>: a private range avoids
            # clashing with another TorchServe on the same machine.
            initial_worker_port=str(free_port()),
            vmargs=absolute_log_config(self.props.get("vmargs", "")),
        )
        self.props.update(overrides or {})
        self.process: subprocess.Popen | None = None
        self.keys: dict[str, str] = {}

    @property
    def inference_url(self) -> str:
        return self.props["inference_address"]

    @property
    def management_url(self) -> str:
        return self.props["management_address"]

    @property
    def metrics_url(self) -> str:
        return self.props["metrics_address"]

    def headers(self, api: str = "inference") -> dict[str, str]:
        """Authorization header for the ``inference`` or ``management`` API (empty without token auth)."""
        return auth_header(self.keys, api)

    def start(self, timeout: float = 120, wait_model: str | None = "emotion") -> float:
        """Start TorchServe and wait until ``wait_model`` has a ready worker; returns the seconds taken."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        config = self.workdir / "config.properties"
        write_properties(config, self.props)
        executable = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or "torchserve"
        command = [executable, "--start", "--foreground", "--ncs", "--ts-config", str(config)]
        if self.models:
            command += ["--models", self.models]
        env = dict(
            os.environ,
            TMPDIR=str(self.workdir),
            LOG_LOCATION=str(self.workdir / "logs"),
            METRICS_LOCATION=str(self.workdir / "logs"),
        )
        self.log_file = (self.workdir / "logs" / "console.log").open("w")
        started = time.monotonic()
        # A new session: stop() signals TorchServe, its JVM and all Python workers together.
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = started + timeout
        while not self.keys and self.process.poll() is None and time.monotonic() < deadline:
            self.keys = read_keys(self.workdir)
            time.sleep(0.1)
        wait_ready(
            self.inference_url,
            self.management_url,
            wait_model,
            self.keys,
            max(deadline - time.monotonic(), 1),
            self.process,
        )
        return time.monotonic() - started

    def stop(self, timeout: float = 30) -> None:
        """Stop the server and every process it started; safe to call twice."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers may outlive the launcher
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        self.log_file.close()

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the console log, for failure messages."""
        path = self.workdir / "logs" / "console.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI for the server that ``make serve`` started from ./config.properties.

    ``wait``: wait until the model is ready and print a sample request.
    ``key inference|management|API``: print a key from key_file.json (for curl).
    """
    parser = argparse.ArgumentParser(description="Wait for TorchServe, or print its keys.")
    parser.add_argument("command", choices=["wait", "key"])
    parser.add_argument("api", nargs="?", default="inference", choices=["inference", "management", "API"])
    parser.add_argument("--model", default="emotion")
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args(argv)
    props = read_properties(CONFIG_PROPERTIES)
    keys = read_keys(PROJECT_ROOT)
    if args.command == "key":
        if args.api not in keys:
            print("no key_file.json here: is TorchServe running (make serve)?", file=sys.stderr)
            return 1
        print(keys[args.api])
        return 0
    inference, management = props["inference_address"], props["management_address"]
    deadline = time.monotonic() + args.timeout
    while not keys and props.get("disable_token_authorization") != "true" and time.monotonic() < deadline:
        time.sleep(0.2)
        keys = read_keys(PROJECT_ROOT)
    try:
        seconds = wait_ready(inference, management, args.model, keys, max(deadline - time.monotonic(), 1))
    except TimeoutError as err:
        print(f"{err}; see logs/model_log.log and logs/ts_log.log", file=sys.stderr)
        return 1
    print(f"TorchServe is ready ({seconds:.1f} s). Try:\n")
    print("  KEY=$(.venv/bin/python -m serving.server key inference)")
    print(
        f"  curl -H \"Authorization: Bearer $KEY\" -H 'Content-Type: text/plain' \\\n"
        f"       --data 'i feel wonderful today' {inference}/predictions/{args.model}\n"
    )
    print("Stop it with: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
