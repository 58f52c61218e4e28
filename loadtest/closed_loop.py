"""A closed-loop HTTP client: N threads, each sending its next request when the last one returns.

Background load for the scaling and version-rollout tests; every status and
latency is kept so a test can prove that no request was lost.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import requests


@dataclass
class LoadResult:
    """Status code (0 for a connection error) and latency in seconds of every request."""

    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    resent: int = 0  # requests sent again after a keep-alive connection closed with no answer

    @property
    def failed(self) -> int:
        return sum(status != 200 for status in self.statuses)


class ClosedLoop:
    """Send ``texts`` round-robin as text/plain to ``url`` from ``concurrency`` threads until stopped."""

    def __init__(self, url: str, headers: dict[str, str], texts: list[str], concurrency: int = 4) -> None:
        self.url = url
        self.headers = {"Content-Type": "text/plain", **headers}
        self.texts = itertools.cycle(texts)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.result = LoadResult()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(concurrency)]

    def _loop(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            with self.lock:
                text = next(self.texts)
            start = time.perf_counter()
            status, error = self._post(session, text)
            with self.lock:
                self.result.statuses.append(status)
                self.result.latencies.append(time.perf_counter() - start)
                if error or status != 200:
                    self.result.errors.append(error or f"HTTP {status}")

    def _post(self, session: requests.Session, text: str) -> tuple[int, str]:
        """One request; ``(status, error)``, status 0 on a connection error.

        A request that finds its idle keep-alive connection closed by the server with no answer
        (nginx closes idle connections when it reloads, e.g. on a key rotation) is sent once more
        on a new connection, as HTTP clients do: the server never read it.
        """
        for attempt in range(2):
            try:
                return session.post(self.url, data=text.encode(), headers=self.headers, timeout=60).status_code, ""
            except requests.ConnectionError as err:
                if attempt == 0 and "RemoteDisconnected" in str(err):
                    with self.lock:
                        self.result.resent += 1
                    continue
                return 0, str(err)
            except requests.RequestException as err:
                return 0, str(err)
        return 0, "unreachable"

    def wait_answered(self, count: int, timeout: float = 120) -> bool:
        """Wait until ``count`` more requests have been answered than when called (False: not
        within ``timeout`` s). Tests wait for answers, not for seconds, so that the load overlaps
        each event however fast the machine is."""
        with self.lock:
            target = len(self.result.statuses) + count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.result.statuses) >= target:
                    return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> ClosedLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)
