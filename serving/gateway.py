"""Run the retrying nginx gateway (``gateway/nginx.conf``) in front of TorchServe's inference API.

TorchServe fails the batch a worker was running when the worker is scaled down or
dies (HTTP 500). The gateway retries such answers on TorchServe's other workers, so
scaling down under load loses no request. ``python -m serving.gateway`` runs it in
the foreground in front of the server that ``make serve`` started.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from serving.server import CONFIG_PROPERTIES, PROJECT_ROOT, read_properties

TEMPLATE = PROJECT_ROOT / "gateway" / "nginx.conf"


def render(upstream: str, listen: str, prefix: Path, tries: int = 3, attempt_timeout: int = 10) -> str:
    """The gateway's nginx config for ``upstream`` (``host:port``), listening on ``listen``.

    Args:
        tries: Attempts per request (first try plus retries).
        attempt_timeout: Seconds without an answer after which an attempt is retried.

    Raises:
        ValueError: ``tries`` or ``attempt_timeout`` is below 1, or an address is not ``host:port``.
    """
    if tries < 1 or attempt_timeout < 1:
        raise ValueError(f"tries and attempt_timeout must be >= 1, got {tries} and {attempt_timeout}")
    for address in (upstream, listen):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {address!r}")
    servers = "\n".join(f"        server {upstream} max_fails=0;" for _ in range(tries))
    text = TEMPLATE.read_text()
    for name, value in {
        "SERVERS": servers,
        "UPSTREAM": upstream,
        "LISTEN": listen,
        "PREFIX": str(prefix),
        "TRIES": str(tries),
        "ATTEMPT_TIMEOUT": str(attempt_timeout),
    }.items():
        text = text.replace(f"@@{name}@@", value)
    return text


class Gateway:
    """An nginx process with its config, logs and temp folders under ``workdir``.

    Args:
        upstream: TorchServe's inference address, ``host:port``.
        workdir: Folder for the rendered config, logs and nginx temp files.
        port: Port the gateway listens on.
        tries: Attempts per request (first try plus retries).
        attempt_timeout: Seconds without an answer after which an attempt is retried.
        host: Address to listen on: 127.0.0.1, or 0.0.0.0 inside a container.
    """

    def __init__(
        self,
        upstream: str,
        workdir: Path,
        port: int,
        tries: int = 3,
        attempt_timeout: int = 10,
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.port = port
        self.config = render(upstream, f"{host}:{port}", self.workdir, tries, attempt_timeout)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def _log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines() if self.access_log.exists() else []

    def retried(self, answered: int = 0, timeout: float = 5.0) -> int:
        """Requests that needed more than one attempt so far (from the access log).

        nginx writes a request's log line only after the client has its answer, so a caller that
        has just received ``answered`` answers passes that count to wait (up to ``timeout``
        seconds) until their lines are in the log.
        """
        deadline = time.monotonic() + timeout
        lines = self._log_lines()
        while len(lines) < answered and time.monotonic() < deadline:
            time.sleep(0.05)
            lines = self._log_lines()
        return sum("upstream=[" in line and "," in line.split("upstream=[", 1)[1].split("]")[0] for line in lines)

    def start(self, timeout: float = 15) -> None:
        """Start nginx and wait until it accepts connections."""
        binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
        if binary is None:
            raise FileNotFoundError("nginx is not installed (make system-deps, or apt-get install nginx)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "nginx.conf"
        config_path.write_text(self.config)
        self.log = (self.workdir / "nginx.out").open("w")
        self.process = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(config_path), "-e", str(self.workdir / "error.log")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                output = (self.workdir / "nginx.out").read_text()
                raise RuntimeError(f"nginx exited with code {self.process.returncode}: {output[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"gateway on {self.url} not accepting connections after {timeout} s")

    def stop(self) -> None:
        """Stop nginx (graceful quit, then kill); safe to call twice."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.log.close()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the gateway in the foreground in front of ``config.properties``' inference address."""
    inference = read_properties(CONFIG_PROPERTIES)["inference_address"].split("//", 1)[-1]
    parser = argparse.ArgumentParser(description="Retrying nginx gateway in front of TorchServe.")
    parser.add_argument("--upstream", default=inference, help=f"TorchServe inference host:port (default {inference})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on (default 8090)")
    parser.add_argument("--tries", type=int, default=3, help="attempts per request (default 3)")
    parser.add_argument("--attempt-timeout", type=int, default=10, help="seconds before an attempt is retried")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "outputs" / "gateway")
    args = parser.parse_args(argv)
    gateway = Gateway(args.upstream, args.workdir, args.port, args.tries, args.attempt_timeout, args.host)
    gateway.start()
    print(f"gateway on {args.host}:{args.port} -> {args.upstream} ({args.tries} tries); logs in {args.workdir}.")
    print("Ctrl-C stops it.")
    try:
        gateway.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
