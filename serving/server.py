"""TorchServe as a managed process, configured from the repository's ``config.properties``.

:class:`TorchServe` derives a configuration for one server (free loopback ports for tests and
benchmarks, or the configured addresses for ``make serve`` and the container), runs it with
:class:`serving.process.ManagedProcess` in its own work folder, and talks to it through
:class:`serving.client.TorchServeClient`. ``serving.stack`` puts it behind the gateway.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from project import MODEL_NAME, PROJECT_ROOT, SERVED_MODELS
from serving.client import TorchServeClient
from serving.process import ManagedProcess

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


class TorchServe:
    """A TorchServe process isolated in ``workdir``.

    Args:
        model_store: Folder holding the archives.
        workdir: Folder for the derived config, logs and key file (TorchServe's working directory).
        models: ``--models`` argument, e.g. ``emotion=emotion.mar`` (None: start empty).
        overrides: Properties that replace the repository's ``config.properties`` values.
        free_ports: Listen on free 127.0.0.1 ports (tests, benchmarks) instead of the configured
            addresses (``make serve``, the container).
    """

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        models: str | None = SERVED_MODELS,
        overrides: dict[str, str] | None = None,
        free_ports: bool = True,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.workdir = Path(workdir).resolve()
        self.models = models
        self.props = read_properties(CONFIG_PROPERTIES)
        self.props.update(
            model_store=str(self.model_store),
            metrics_config=str(PROJECT_ROOT / self.props.get("metrics_config", "monitoring/metrics.yaml")),
            vmargs=absolute_log_config(self.props.get("vmargs", "")),
        )
        if free_ports:
            self.props.update(
                inference_address=f"http://127.0.0.1:{free_port()}",
                management_address=f"http://127.0.0.1:{free_port()}",
                metrics_address=f"http://127.0.0.1:{free_port()}",
                # Workers talk to the front end over /tmp/.ts.sock.<port>: a private range avoids
                # clashing with another TorchServe on the same machine.
                initial_worker_port=str(free_port()),
                grpc_inference_port=str(free_port()),
                grpc_management_port=str(free_port()),
            )
        self.props.update(overrides or {})
        token_auth = self.props.get("disable_token_authorization", "false").lower() != "true"
        self.client = TorchServeClient(
            self.inference_url, self.management_url, self.workdir / "key_file.json" if token_auth else None
        )
        self.process: ManagedProcess | None = None
        # The JVM's temporary folder while it runs: the archives it unpacked, the workers' sockets.
        self.unpacked: Path | None = None

    @property
    def inference_url(self) -> str:
        return self.props["inference_address"]

    @property
    def management_url(self) -> str:
        return self.props["management_address"]

    @property
    def metrics_url(self) -> str:
        return self.props["metrics_address"]

    @property
    def keys(self) -> dict[str, str]:
        """The current keys by API (``inference``, ``management``, ``API``)."""
        return self.client.keys

    def headers(self, api: str = "inference") -> dict[str, str]:
        """Authorization header for the ``inference`` or ``management`` API (empty without token auth)."""
        return self.client.headers(api)

    def start(self, timeout: float = 120, wait_model: str | None = MODEL_NAME) -> float:
        """Start TorchServe and wait until ``wait_model`` has a ready worker; returns the seconds taken."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)  # the keys of an earlier run
        config = self.workdir / "config.properties"
        write_properties(config, self.props)
        executable = shutil.which("torchserve", path=str(Path(sys.executable).parent)) or "torchserve"
        command = [executable, "--start", "--foreground", "--ncs", "--ts-config", str(config)]
        if self.models:
            command += ["--models", self.models]
        # TorchServe unpacks every archive it loads under the JVM's temporary folder (``TEMP``
        # sets it) and leaves the copy behind when it stops: a folder of this start's own, removed
        # on stop, keeps a machine's /tmp from filling, one archive per start. It is short, in the
        # system's temporary folder: the workers' Unix sockets live there too, and a socket's path
        # may not exceed 107 bytes (a worker in a deep work folder could not start).
        self._remove_unpacked()
        self.unpacked = Path(tempfile.mkdtemp(prefix="ts-"))
        env = dict(
            os.environ,
            TMPDIR=str(self.workdir),
            TEMP=str(self.unpacked),
            LOG_LOCATION=str(self.workdir / "logs"),
            METRICS_LOCATION=str(self.workdir / "logs"),
        )
        (self.workdir / "logs" / "console.log").unlink(missing_ok=True)
        self.process = ManagedProcess("TorchServe", command, self.workdir / "logs" / "console.log", self.workdir, env)
        started = time.monotonic()
        self.process.start()
        if self.client.key_file is not None:
            self.process.wait_until(lambda: bool(self.keys), timeout, "writing its keys")
        self.client.wait_ready(wait_model, max(timeout - (time.monotonic() - started), 1), self.process)
        return time.monotonic() - started

    def _remove_unpacked(self) -> None:
        if self.unpacked is not None:
            shutil.rmtree(self.unpacked, ignore_errors=True)
            self.unpacked = None

    def stop(self, timeout: float = 30) -> None:
        """Stop the server and every process it started, and remove the unpacked archives; safe
        to call twice."""
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None
        self._remove_unpacked()

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the console log, for failure messages."""
        path = self.workdir / "logs" / "console.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
