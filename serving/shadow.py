"""A rollout's shadow traffic, kept off the clients' path (``serving.rollout``, shadow phase).

The gateway mirrors a share of the served model's requests (nginx ``mirror``). nginx keeps a
client's connection until its mirror is answered, so a mirror sent straight to a busy candidate
would delay the client's next request on that connection. The mirror goes to a
:class:`ShadowRelay` instead: it answers at once (204), queues the request (a bounded queue: when
it is full, a mirror is dropped and counted, never waited for) and sends it to the candidate
version from its own threads, recording each answer's status and seconds.

During the shadow, the candidate's workers run at the lowest CPU priority (:func:`set_idle`:
``SCHED_IDLE`` for every thread): they compute with the cores the current version leaves idle,
so the clients' latency stays the current version's. Their latency is therefore judged in the
canary phases, where they run at normal priority and serve clients.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import requests

from project import LOOPBACK

log = logging.getLogger(__name__)

# The client's request id, which the gateway sends with each mirror (the mirror has its own).
CLIENT_ID_HEADER = "X-Emotion-Client-Request-ID"
PROTOCOL_HEADER = "X-Emotion-Protocol"  # the gateway's mark of an OIP request (handler/emotion_inputs.py)
QUEUE_SIZE = 512


@dataclass(frozen=True)
class ShadowAnswer:
    """The candidate's answer to one mirrored request."""

    client_id: str
    shadow_id: str
    status: int  # 0: no answer
    seconds: float


class ShadowRelay:
    """Takes the gateway's mirrors on ``127.0.0.1:<port>`` and sends them to ``target_url``.

    Args:
        target_url: The candidate's route on TorchServe (``.../predictions/<model>/<version>``).
        headers: Headers for TorchServe (its inference key), called per request (the key rotates).
        senders: Threads sending to the candidate (its requests in flight at most).
        timeout: Seconds one mirrored request may take.
    """

    def __init__(self, target_url: str, headers, senders: int = 2, timeout: float = 30.0) -> None:
        self.target_url, self.headers, self.timeout = target_url, headers, timeout
        self.queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self._answers: list[ShadowAnswer] = []
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length > 0 else b""
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                item = (
                    body,
                    self.headers.get("Content-Type", "text/plain"),
                    self.headers.get("X-Request-ID", ""),
                    self.headers.get(CLIENT_ID_HEADER, ""),
                    self.headers.get(PROTOCOL_HEADER, ""),
                )
                try:
                    relay.queue.put_nowait(item)
                except queue.Full:
                    with relay._lock:
                        relay.dropped += 1

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.server.serve_forever, name="shadow-relay", daemon=True)]
        self._threads += [
            threading.Thread(target=self._send, name="shadow-sender", daemon=True) for _ in range(senders)
        ]

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> ShadowRelay:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def take(self) -> list[ShadowAnswer]:
        """The answers recorded since the last call."""
        with self._lock:
            answers, self._answers = self._answers, []
        return answers

    def _send(self) -> None:
        # This thread's share of the shadow's cost (HTTP to the candidate) at the lowest priority too.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        session = requests.Session()
        while not self._stop.is_set():
            try:
                body, content_type, shadow_id, client_id, protocol = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            started = time.perf_counter()
            headers = {**self.headers(), "Content-Type": content_type, "X-Request-ID": shadow_id}
            if protocol:  # an OIP request: the candidate writes its answer as the current version does
                headers[PROTOCOL_HEADER] = protocol
            try:
                status = session.post(self.target_url, data=body, headers=headers, timeout=self.timeout).status_code
            except requests.RequestException:
                status = 0
            answer = ShadowAnswer(client_id, shadow_id, status, time.perf_counter() - started)
            with self._lock:
                self._answers.append(answer)


def set_idle(pids: list[int], idle: bool) -> int:
    """Every thread of the processes ``pids`` to ``SCHED_IDLE`` (``idle``) or back to the normal
    policy; returns how many threads changed. A process that is gone, or a change the system
    refuses, is skipped (logged)."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    changed = 0
    for pid in pids:
        try:
            threads = [t.id for t in psutil.Process(pid).threads()]
        except psutil.Error:
            continue
        for tid in threads:
            with contextlib.suppress(ProcessLookupError):
                try:
                    os.sched_setscheduler(tid, policy, os.sched_param(0))
                    changed += 1
                except PermissionError as err:
                    log.warning("cannot set the CPU policy of thread %d: %s", tid, err)
    return changed
