"""the gateway's access log: counted into Prometheus metrics, and rotated by size.

nginx writes one line per request (``serving/nginx.conf``, format ``upstreams``). :class:`AccessLog`
reads the lines added since its last call, counts answers by status code, upstream attempts and
retried requests, and renders them in Prometheus' text format for the gateway's ``/metrics``.
When the file passes ``max_bytes`` it is renamed (``access.log.1`` ... ``access.log.<backups>``)
and nginx is told to reopen it, so the log never grows without bound.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import BinaryIO

from serving.gateway import attempts

STATUS = re.compile(r'" (\d{3}) upstream=\[')


class AccessLog:
    """Counters over an nginx access log, with size-based rotation.

    Args:
        path: The log nginx writes.
        max_bytes: Size at which the file is rotated.
        backups: Rotated files kept.
    """

    def __init__(self, path: Path, max_bytes: int = 50 * 2**20, backups: int = 3) -> None:
        if max_bytes < 1 or backups < 1:
            raise ValueError("max_bytes and backups must be >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.responses: Counter[str] = Counter()
        self.attempts = 0
        self.retried = 0
        self._handle: BinaryIO | None = None
        self._partial = ""

    def poll(self) -> int:
        """Count the complete lines written since the last call; returns how many.

        The log is read through an open handle, so lines written to it after a rotation renamed
        it, until nginx reopened the new file, are still counted.
        """
        count = self._read()
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return count
        if self._handle is None or inode != os.fstat(self._handle.fileno()).st_ino:
            if self._handle is not None:
                self._handle.close()
            self._handle, self._partial = self.path.open("rb"), ""
            count += self._read()
        return count

    def _read(self) -> int:
        if self._handle is None:
            return 0
        text = self._partial + self._handle.read().decode("utf-8", "replace")
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._count(line)
        return len(lines)

    def close(self) -> None:
        """Close the log handle."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _count(self, line: str) -> None:
        match = STATUS.search(line)
        if not match:
            return
        self.responses[match.group(1)] += 1
        tried = attempts(line)
        self.attempts += tried
        self.retried += tried > 1

    def rotate_if_needed(self) -> bool:
        """Rename the log when it is over ``max_bytes``; returns True when the caller must have
        nginx reopen its logs. Lines not yet counted are counted first."""
        try:
            if self.path.stat().st_size < self.max_bytes:
                return False
        except FileNotFoundError:
            return False
        self.poll()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        return True

    def metrics(self, ready: bool, up: bool, ready_workers: int) -> str:
        """The gateway's metrics in Prometheus' text exposition format."""
        lines = [
            "# HELP emotion_gateway_responses_total Answers of the gateway by HTTP status code.",
            "# TYPE emotion_gateway_responses_total counter",
            *(f'emotion_gateway_responses_total{{code="{code}"}} {n}' for code, n in sorted(self.responses.items())),
            "# HELP emotion_gateway_upstream_attempts_total Requests sent to TorchServe, retries included.",
            "# TYPE emotion_gateway_upstream_attempts_total counter",
            f"emotion_gateway_upstream_attempts_total {self.attempts}",
            "# HELP emotion_gateway_retried_requests_total Requests that needed more than one attempt.",
            "# TYPE emotion_gateway_retried_requests_total counter",
            f"emotion_gateway_retried_requests_total {self.retried}",
            "# HELP emotion_gateway_ready 1 while /ready answers 200.",
            "# TYPE emotion_gateway_ready gauge",
            f"emotion_gateway_ready {int(ready)}",
            "# HELP emotion_gateway_up 1 while predictions are let through (a worker is READY).",
            "# TYPE emotion_gateway_up gauge",
            f"emotion_gateway_up {int(up)}",
            "# HELP emotion_gateway_ready_workers READY workers of the served model.",
            "# TYPE emotion_gateway_ready_workers gauge",
            f"emotion_gateway_ready_workers {ready_workers}",
        ]
        return "\n".join(lines) + "\n"
