"""Start a container of the serving image, get a prediction through its gateway, stop it.

``python -m docker.smoke --image localhost/emotion-serve:cpu`` (``make image-smoke``) runs the
image's own entrypoint and checks, through the gateway published on 127.0.0.1:

* a prediction with the gateway key answers 200 with the six labels' probabilities;
* ``/live`` and ``/ready`` answer 200 without a key, a prediction without a key is refused, and
  the image's HEALTHCHECK command passes;
* on SIGTERM the container stops within ``--stop-timeout`` and leaves no process behind.

Engines: ``docker run -p 127.0.0.1:PORT:8080`` where a Docker engine answers; otherwise
``buildah run --isolation chroot`` inside a network namespace of its own (so the container's
ports never meet the host's) and a PID namespace (so nothing outlives it), with the gateway
published on the host's 127.0.0.1 by a forwarder that connects from inside that namespace.
Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from project import GATEWAY_PORT
from serving.process import ManagedProcess
from serving.server import free_port

LABELS = {"sadness", "joy", "love", "anger", "fear", "surprise"}
CONTAINER_PORT = GATEWAY_PORT
CLONE_NEWNET = 0x40000000


class SmokeError(RuntimeError):
    """A check failed; the message says which and what was seen."""


def http(method: str, url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, bytes]:
    """One request; returns status and body (connection errors count as status 0)."""
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "text/plain")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


class NetnsForward:
    """Forward ``127.0.0.1:<port>`` on the host to ``127.0.0.1:<target>`` inside a network namespace.

    Each connection gets a thread that joins the namespace (``setns`` moves only the calling
    thread) before it connects, so the container's loopback is reached without any address
    outside the loopback range.
    """

    def __init__(self, netns: str, port: int, target: int = CONTAINER_PORT) -> None:
        self.netns_path = f"/run/netns/{netns}"
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        fd = os.open(self.netns_path, os.O_RDONLY)
        try:
            if self._libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.netns_path}")
        finally:
            os.close(fd)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class BuildahContainer:
    """A container of ``image`` run with ``buildah run --isolation chroot`` in its own namespaces."""

    def __init__(self, image: str, port: int, log_path: Path) -> None:
        self.image = image
        self.port = port
        self.log_path = log_path
        self.name = f"emotion-smoke-{os.getpid()}"
        self.netns = self.name
        self.process: ManagedProcess | None = None
        self.forward: NetnsForward | None = None
        self.ctr: str | None = None
        self.config: dict = {}

    def start(self) -> None:
        for tool in ("buildah", "ip", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                raise SmokeError(f"{tool} is missing (apt-get install buildah iproute2 util-linux)")
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        # The container's hostname resolves (TorchServe's JVM looks its own name up at start).
        self.ctr = self._out(
            ["buildah", "from", "--pull-never", "--name", self.name, "--add-host", f"{self.name}:127.0.0.1", self.image]
        )
        inspect = json.loads(self._out(["buildah", "inspect", "--type", "container", self.ctr]))
        self.config = inspect["Docker"]["config"]
        command = (self.config.get("Entrypoint") or []) + (self.config.get("Cmd") or [])
        # The PID namespace's first process is `buildah run`: when it ends, the kernel ends every
        # process left in the namespace, so nothing can outlive the container.
        self.log_path.unlink(missing_ok=True)
        self.process = ManagedProcess(
            "the container",
            ["ip", "netns", "exec", self.netns, "unshare", "--pid", "--fork", "--kill-child",
             "buildah", "run", "--isolation", "chroot", "--hostname", self.name, self.ctr, "--", *command],
            self.log_path,
        )  # fmt: skip
        self.process.start()
        self.forward = NetnsForward(self.netns, self.port)
        self.forward.start()

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        """Run ``command`` inside the running container, as ``docker exec`` does: in the namespaces,
        root, working folder, user and environment of its first process. (A second ``buildah run``
        would not do: each one gets a file system view of its own.)"""
        pid = self._entrypoint_pid()
        if pid is None:
            return subprocess.CompletedProcess(command, 1, "", "the container is not running")
        status = Path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M).group(1)
        environ = [v for v in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if v]
        return subprocess.run(
            ["nsenter", "--target", str(pid), "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
             "--setuid", uid, "--setgid", gid, "env", "-i", *environ, *command],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def pids(self) -> list[int]:
        """Processes in the container's network namespace."""
        result = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(pid) for pid in result.stdout.split()]

    def stop(self, timeout: float) -> float:
        """SIGTERM to the entrypoint's first process (tini), as `docker stop` does; returns the seconds
        it took everything to exit. Raises SmokeError when it did not in time (then kills it)."""
        began = time.monotonic()
        init = self._entrypoint_pid()
        if init is not None:
            os.kill(init, signal.SIGTERM)
        deadline = began + timeout
        while time.monotonic() < deadline and (self.running() or self.pids()):
            time.sleep(0.2)
        if self.running() or self.pids():
            self.kill()
            raise SmokeError(f"the container did not stop within {timeout:.0f} s of SIGTERM")
        return time.monotonic() - began

    def _entrypoint_pid(self) -> int | None:
        first = (self.config.get("Entrypoint") or self.config.get("Cmd") or [""])[0]
        for pid in sorted(self.pids()):
            try:
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if argv0 == first:
                return pid
        return None

    def kill(self) -> None:
        if self.process is not None:
            self.process.stop(30, sig=signal.SIGKILL)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        """Stop the forwarder, remove the container and the namespace (whatever was created)."""
        if self.forward is not None:
            self.forward.stop()
        self.kill()
        if self.ctr is not None:
            subprocess.run(["buildah", "rm", self.ctr], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)

    @staticmethod
    def _out(command: list[str]) -> str:
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


class DockerContainer:
    """A container of ``image`` run by a Docker engine, its port 8080 published on 127.0.0.1."""

    def __init__(self, image: str, port: int, log_path: Path) -> None:
        self.image = image
        self.port = port
        self.log_path = log_path
        self.name = f"emotion-smoke-{os.getpid()}"
        self.config: dict = {}

    def start(self) -> None:
        subprocess.run(
            ["docker", "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:{CONTAINER_PORT}", self.image],
            check=True, capture_output=True,
        )  # fmt: skip
        inspect = json.loads(subprocess.run(["docker", "inspect", self.image], capture_output=True).stdout)
        self.config = inspect[0]["Config"]

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["docker", "exec", self.name, *command], capture_output=True, text=True, timeout=60)

    def running(self) -> bool:
        result = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", self.name], capture_output=True)
        return result.stdout.strip() == b"true"

    def stop(self, timeout: float) -> float:
        began = time.monotonic()
        subprocess.run(["docker", "stop", "-t", str(int(timeout)), self.name], capture_output=True)
        exit_code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", self.name], capture_output=True)
        if exit_code.stdout.strip() == b"137":
            raise SmokeError(f"the container did not stop within {timeout:.0f} s of SIGTERM (killed)")
        return time.monotonic() - began

    def remove(self) -> None:
        with self.log_path.open("wb") as log:
            subprocess.run(["docker", "logs", self.name], stdout=log, stderr=subprocess.STDOUT)
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)


def read_key(container: BuildahContainer | DockerContainer) -> str | None:
    """The key a client sends: the gateway key (``serving key``), once the stack made it."""
    result = container.exec("python", "-m", "serving", "key")
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else None


def check(container: BuildahContainer | DockerContainer, timeout: float) -> dict:
    """The checks of the module docstring against a started container; returns what was measured."""
    base = f"http://127.0.0.1:{container.port}"
    began = time.monotonic()
    deadline = began + timeout
    while container.exec("true").returncode != 0:  # until the entrypoint runs
        if time.monotonic() > deadline or not container.running():
            raise SmokeError("the container's entrypoint did not start")
        time.sleep(0.5)
    status, body, key = 0, b"", None
    while time.monotonic() < deadline:
        if not container.running():
            raise SmokeError("the container exited before it answered")
        key = key or read_key(container)
        if key:
            status, body = http("POST", f"{base}/predictions/emotion", b"i feel wonderful today", key)
            if status == 200:
                break
        time.sleep(1)
    if status != 200:
        raise SmokeError(f"no prediction within {timeout:.0f} s (last status {status}, key found: {bool(key)})")
    answer = json.loads(body)
    if answer.get("label") not in LABELS or set(answer.get("probabilities", {})) != LABELS:
        raise SmokeError(f"unexpected answer {answer}")
    if abs(sum(answer["probabilities"].values()) - 1) > 1e-3:
        raise SmokeError(f"probabilities do not sum to 1: {answer}")
    result = {"seconds_to_first_prediction": round(time.monotonic() - began, 1), "answer": answer}
    # A prediction is served as soon as one worker is up; /ready also waits for the golden check,
    # which runs on its own thread after that: poll it until the same deadline.
    for path in ("/live", "/ready"):
        while (got := http("GET", f"{base}{path}"))[0] != 200 and time.monotonic() < deadline:
            if not container.running():
                raise SmokeError(f"the container exited before GET {path} answered 200")
            time.sleep(1)
        if got[0] != 200:
            raise SmokeError(
                f"GET {path} answered {got[0]} without a key within {timeout:.0f} s, expected 200: "
                f"{got[1][:300].decode(errors='replace')}"
            )
    result["seconds_to_ready"] = round(time.monotonic() - began, 1)
    if (got := http("POST", f"{base}/predictions/emotion", b"i feel fine")[0]) not in (401, 403):
        raise SmokeError(f"a prediction without a key answered {got}, expected 401 or 403")
    healthcheck = (container.config.get("Healthcheck") or {}).get("Test") or []
    if healthcheck[:1] != ["CMD"]:
        raise SmokeError(f"the image has no exec-form HEALTHCHECK: {healthcheck}")
    if (run := container.exec(*healthcheck[1:])).returncode != 0:
        raise SmokeError(f"the HEALTHCHECK command failed: {run.stderr[-500:]}")
    result["gateway"] = "serving"
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/emotion-serve:cpu")
    parser.add_argument("--port", type=int, default=0, help="host port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the first prediction")
    parser.add_argument("--stop-timeout", type=float, default=60, help="seconds from SIGTERM to no process left")
    parser.add_argument("--engine", choices=["docker", "buildah"], default=None)
    parser.add_argument("--log", type=Path, default=Path("outputs/image-smoke.log"))
    args = parser.parse_args(argv)
    engine = args.engine or (
        "docker" if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        else "buildah"
    )  # fmt: skip
    args.log.parent.mkdir(parents=True, exist_ok=True)
    container_type = DockerContainer if engine == "docker" else BuildahContainer
    container = container_type(args.image, args.port or free_port(), args.log)
    try:
        container.start()
        result = check(container, args.timeout)
        result["seconds_to_stop"] = round(container.stop(args.stop_timeout), 1)
    except (SmokeError, subprocess.CalledProcessError) as err:
        print(f"image smoke FAILED: {err} (container log: {args.log})", file=sys.stderr)
        print(args.log.read_text(errors="replace")[-3000:] if args.log.exists() else "", file=sys.stderr)
        return 1
    finally:
        container.remove()
    print(json.dumps({"image": args.image, "engine": engine, "port": container.port, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
