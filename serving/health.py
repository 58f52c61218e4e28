"""What the front door's ``/ready`` says, and whether it lets predictions through.

TorchServe's ``/ping`` answers "Healthy" while every worker is dead or still failing to load.
:class:`Readiness` asks what matters instead, on TorchServe's own ports (never through the
gateway): how many workers are READY (management API, every ``interval`` seconds), and whether
a golden text gets its expected label (every ``golden_interval`` seconds, cached in between).

* ``up``: at least one READY worker. Without one, the gateway refuses predictions at once (503)
  instead of letting them wait in TorchServe's queue until a timeout.
* ``ready``: ``up`` and the golden text got its label at the last check. A golden request that
  TorchServe refuses because it is busy (503) or that times out keeps the last verdict: load is
  not a failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import requests

from serving.client import TorchServeClient

log = logging.getLogger(__name__)

GOLDEN_TEXT = "i feel so happy and excited about today, everything is wonderful"
GOLDEN_LABEL = "joy"


@dataclass
class HealthState:
    """The last verdicts."""

    ready_workers: int = 0
    golden_ok: bool | None = None  # None: not checked yet
    golden_label: str | None = None
    checked_at: float = 0.0

    @property
    def up(self) -> bool:
        return self.ready_workers > 0

    @property
    def ready(self) -> bool:
        return self.up and bool(self.golden_ok)


class Readiness:
    """Periodic checks of one model on one TorchServe.

    Args:
        client: The TorchServe to check (its own inference and management ports).
        model: The model the front door serves.
        golden_text: A text whose label is known.
        golden_label: The label it must get.
        interval: Seconds between worker checks.
        golden_interval: Seconds between golden checks.
    """

    def __init__(
        self,
        client: TorchServeClient,
        model: str = "emotion",
        golden_text: str = GOLDEN_TEXT,
        golden_label: str = GOLDEN_LABEL,
        interval: float = 1.0,
        golden_interval: float = 10.0,
    ) -> None:
        self.client = client
        self.model = model
        self.golden_text = golden_text
        self.golden_label = golden_label
        self.interval = interval
        self.golden_interval = golden_interval
        self.state = HealthState()
        self._golden_at = float("-inf")
        self._workers_at = float("-inf")

    def check(self, now: float | None = None) -> HealthState:
        """Run the checks that are due; returns the current state."""
        now = time.monotonic() if now is None else now
        if now - self._workers_at >= self.interval:
            self._workers_at = now
            self.state.ready_workers = self.client.ready_workers(self.model)
            self.state.checked_at = time.time()
        if not self.state.up:
            self.state.golden_ok = None  # check again as soon as a worker is back
            self._golden_at = float("-inf")
        elif now - self._golden_at >= self.golden_interval:
            self._golden_at = now
            self._check_golden()
        return self.state

    def _check_golden(self) -> None:
        try:
            response = self.client.predict(self.golden_text, self.model, timeout=5, probe=True)
        except requests.RequestException as err:
            log.warning("golden check: no answer (%s); keeping the last verdict", err)
            return
        if response.status_code in (429, 503):
            log.info("golden check: TorchServe is busy (%d); keeping the last verdict", response.status_code)
            return
        try:
            label = response.json().get("label") if response.status_code == 200 else None
        except ValueError:
            label = None
        ok = label == self.golden_label
        if not ok:
            log.error(
                "golden check failed: %r got %s %s, expected %r",
                self.golden_text,
                response.status_code,
                label,
                self.golden_label,
            )
        self.state.golden_ok, self.state.golden_label = ok, label
