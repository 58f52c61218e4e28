"""One way to run a server process: TorchServe, the nginx gateway and Prometheus all use it.

A :class:`ManagedProcess` starts its command in a new session (so that stopping it reaches every
process it started: TorchServe's JVM and its Python workers, nginx's worker), logs to a file,
waits for a readiness probe while watching for an early exit, and stops with a signal, then
SIGKILL after a timeout. Stopping is safe to repeat. A process meant to outlive the one that
started it (``make serve``, stopped later by ``make stop``) records its pid in a pid file, and
:meth:`ManagedProcess.stop_recorded` stops it from any other process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class ManagedProcess:
    """A long-running child process in its own session, logging to ``log_path``.

    Args:
        name: What the process is, for messages ("TorchServe", "nginx").
        command: The command line.
        log_path: File that receives stdout and stderr (appended to).
        cwd: Working directory.
        env: Environment (default: this process's).
        pid_file: File the pid is written to at start and removed from at stop (background runs).
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        pid_file: Path | None = None,
    ) -> None:
        self.name = name
        self.pid_file = pid_file
        self.command = list(command)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = env
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the command; returns at once (see :meth:`wait_until`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if self.pid_file is not None:
            self.pid_file.write_text(str(self.process.pid))

    def wait_until(self, probe: Callable[[], bool], timeout: float, what: str = "ready") -> float:
        """Poll ``probe`` until it returns true; returns the seconds waited.

        Raises:
            RuntimeError: The process exited first (the message ends with its log's tail).
            TimeoutError: ``probe`` stayed false for ``timeout`` seconds.
        """
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.running():
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"{self.name} exited with code {code} before it was {what}:\n{self.tail()}")
            if probe():
                return time.monotonic() - start
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not {what} after {timeout:.0f} s; log: {self.log_path}")

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group); no-op once it has exited."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def stop(self, timeout: float = 30, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the whole session, wait up to ``timeout`` s, then SIGKILL what is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Children that outlived the leader (TorchServe's workers) are in the same session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

    @staticmethod
    def recorded(pid_file: Path) -> int | None:
        """The pid in ``pid_file`` while that process runs; None otherwise."""
        try:
            pid = int(Path(pid_file).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    @staticmethod
    def stop_recorded(pid_file: Path, timeout: float = 30, sig: int = signal.SIGTERM) -> bool:
        """Stop the process recorded in ``pid_file`` (started by another process): ``sig`` to it,
        wait up to ``timeout`` s for it to exit, then SIGKILL its whole session. Returns whether
        one was running; the pid file is removed in any case."""
        pid = ManagedProcess.recorded(pid_file)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and ManagedProcess.recorded(pid_file):
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        Path(pid_file).unlink(missing_ok=True)
        return pid is not None

    def tail(self, lines: int = 60) -> str:
        """The last lines of the log, for error messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
