"""Readiness and liveness verdicts against a scripted TorchServe client: no server, a fake clock."""

from __future__ import annotations

import threading

import pytest
import requests

from serving.client import TorchServeClient
from serving.golden import GoldenRecord
from serving.health import HealthState, Liveness, Readiness

RECORD = GoldenRecord(
    ("i feel great", "i am scared"),
    ({"joy": 0.9, "fear": 0.1}, {"joy": 0.2, "fear": 0.8}),
    engine="onnx int8",
    noise=0.01,
    tolerance=0.03,
)
GOOD = "the record's own answers"


class Answer:
    """What ``requests`` returns, reduced to what the golden check reads."""

    def __init__(self, status: int, body: dict | None = None, text: str = "") -> None:
        self.status_code = status
        self._body = body
        self.text = text or ("" if body is None else str(body))

    def json(self) -> dict:
        if self._body is None:
            raise ValueError("no JSON")
        return self._body


def worker(status: str = "READY") -> dict:
    return {"id": "9000", "status": status}


class ScriptedTorchServe(TorchServeClient):
    """A TorchServe client whose HTTP calls are scripted: ``versions`` is what the describe API
    answers for all versions (the first one is the default, as ``GET /models/emotion`` describes
    it), ``golden`` what each golden request gets (an :class:`Answer` or an exception to raise)."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:1", "http://127.0.0.1:2", None)
        self.versions = [{"modelVersion": "1.0", "minWorkers": 2, "workers": [worker(), worker()]}]
        self.golden: Answer | Exception | str = GOOD
        self.release: threading.Event | None = None  # set: golden requests wait for it

    def manage(self, method, path, timeout=180, **params):
        assert method == "GET", (method, path)
        if path == "/models/emotion/all":
            return self.versions
        assert path == "/models/emotion", path
        return self.versions[:1]

    def predict(self, text, model="emotion", timeout=30, probe=False):
        assert probe
        if self.release is not None:
            self.release.wait(120)
        if isinstance(self.golden, Exception):
            raise self.golden
        if self.golden == GOOD:
            index = RECORD.texts.index(text)
            return Answer(200, {"label": RECORD.label(index), "probabilities": RECORD.probabilities[index]})
        return self.golden


def step(readiness: Readiness, now: float) -> HealthState:
    """One supervisor round at ``now``, with the golden check it started answered."""
    state = readiness.check(now)
    readiness.wait_golden(5)
    return state


def run(readiness: Readiness, start: float, seconds: float) -> HealthState:
    """Supervisor rounds every second from ``start`` for ``seconds``."""
    state = readiness.state
    for t in range(int(start), int(start + seconds) + 1):
        state = step(readiness, float(t))
    return state


@pytest.fixture
def torchserve() -> ScriptedTorchServe:
    return ScriptedTorchServe()


@pytest.mark.parametrize(
    "no_verdict",
    [Answer(503, {"message": "Prediction failed"}), requests.Timeout("read timed out")],
    ids=["503", "timeout"],
)
def test_a_model_that_only_answers_503_or_times_out_is_soon_not_ready(torchserve, no_verdict):
    readiness = Readiness(torchserve, golden=RECORD)  # defaults: golden check every 10 s, a verdict kept 60 s
    assert step(readiness, 0.0).ready
    torchserve.golden = no_verdict  # TorchServe's answer to any handler exception, or none at all
    assert run(readiness, 1, 49).ready  # a burst of overload keeps the last good verdict...
    assert not run(readiness, 51, 30).ready  # ...but not for ever
    assert not run(readiness, 82, 400).ready
    torchserve.golden = GOOD
    assert run(readiness, 483, 10).ready  # a good answer makes it ready again


def test_the_bound_on_a_kept_verdict_is_a_setting(torchserve):
    readiness = Readiness(torchserve, golden=RECORD, golden_interval=5, golden_max_age=12)
    assert step(readiness, 0.0).ready
    torchserve.golden = Answer(503)
    assert run(readiness, 1, 10).ready  # checks at 5 and 10: 10 s old
    assert not run(readiness, 11, 5).ready  # the check at 15: 15 s old


def test_busy_answers_never_make_an_unchecked_or_failed_verdict_good(torchserve):
    torchserve.golden = Answer(503)
    readiness = Readiness(torchserve, golden=RECORD)
    assert not run(readiness, 0, 30).ready  # never checked: not ready
    torchserve.golden = Answer(200, {"label": "fear", "probabilities": {"joy": 0.4, "fear": 0.6}})
    assert not run(readiness, 31, 10).ready
    torchserve.golden = Answer(503)
    assert not run(readiness, 42, 30).ready


def test_a_key_renewed_while_the_golden_request_was_out_is_no_verdict(torchserve):
    readiness = Readiness(torchserve, golden=RECORD)
    assert step(readiness, 0.0).ready
    torchserve.golden = Answer(400, text='{"code": 400, "message": "Token Authorization failed. Token either ..."}')
    assert step(readiness, 10.0).ready
    torchserve.golden = Answer(400, {"message": "bad input"})  # any other 400 is a failed check
    assert not step(readiness, 20.0).ready


def test_only_workers_of_the_default_version_count(torchserve):
    # set-default to a version whose workers are still loading: the old version's READY workers
    # serve nothing on /predictions/emotion
    torchserve.versions = [
        {"modelVersion": "2.0", "minWorkers": 1, "workers": [worker("STARTING")]},
        {"modelVersion": "1.0", "minWorkers": 2, "workers": [worker(), worker()]},
    ]
    readiness = Readiness(torchserve, golden=RECORD)
    state = step(readiness, 0.0)
    assert state.ready_workers == 0 and not state.up and not state.ready
    assert torchserve.ready_workers() == 0
    torchserve.versions[0]["workers"] = [worker()]
    state = step(readiness, 1.0)
    assert state.ready_workers == 1 and state.up and state.ready and state.expected_workers == 1


def test_the_golden_check_does_not_hold_up_the_worker_check(torchserve):
    readiness = Readiness(torchserve, golden=RECORD)
    assert step(readiness, 0.0).ready
    torchserve.release = threading.Event()  # the next golden request hangs until released
    try:
        done = threading.Event()

        def rounds():
            readiness.check(10.0)  # starts the golden check
            torchserve.versions[0]["workers"] = []  # the workers die meanwhile
            readiness.check(11.0)
            done.set()

        threading.Thread(target=rounds, daemon=True).start()
        # The golden request hangs until released below: a worker check that waited for it
        # could not finish before then, however long this waits.
        assert done.wait(60), "a worker check waited for the golden answer"
        assert not readiness.state.up
    finally:
        torchserve.release.set()
    readiness.wait_golden(5)
    assert not readiness.state.ready  # the answer to a request sent before the loss is dropped
    torchserve.versions[0]["workers"] = [worker()]
    assert step(readiness, 12.0).ready


def test_torchserve_not_answering_the_worker_check_is_no_ready_worker(torchserve):
    readiness = Readiness(torchserve, golden=RECORD)
    assert step(readiness, 0.0).up

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("refused")

    torchserve.manage = refuse
    state = step(readiness, 1.0)
    assert not state.up and state.expected_workers == 2  # the last known


def test_a_worker_check_answered_late_keeps_the_last_count_for_a_grace(torchserve):
    """Under a saturated CPU the describe answer may come late: predictions are still served,
    until TorchServe has not answered for the whole grace."""
    clock = [0.0]
    readiness = Readiness(torchserve, golden=RECORD, workers_grace=10.0, clock=lambda: clock[0])
    assert step(readiness, 0.0).up
    answer = torchserve.manage

    def late(*args, **kwargs):
        raise requests.ReadTimeout("no answer in time")

    torchserve.manage = late
    for now in (1.0, 5.0, 10.0):
        clock[0] = now
        assert step(readiness, now).up, now
    clock[0] = 11.0
    assert not step(readiness, 11.0).up
    torchserve.manage = answer
    clock[0] = 12.0
    assert step(readiness, 12.0).up


def ready() -> HealthState:
    return HealthState(ready_workers=2, golden_ok=True, expected_workers=2)


def no_worker(expected: int | None = 2) -> HealthState:
    return HealthState(ready_workers=0, expected_workers=expected)


def failing_golden() -> HealthState:
    return HealthState(ready_workers=2, golden_ok=False, expected_workers=2)


@pytest.mark.parametrize("unready", [no_worker, failing_golden])
def test_liveness_fails_once_not_ready_past_the_bound_after_having_been_ready(unready):
    liveness = Liveness(limit=300)
    assert liveness.failure(ready(), now=0) is None
    assert liveness.failure(unready(), now=10) is None
    assert liveness.failure(unready(), now=310) is None  # 300 s: not past the bound yet
    reason = liveness.failure(unready(), now=311)
    assert reason and "not ready for 301 s" in reason
    assert liveness.failure(ready(), now=312) is None  # ready again: counting starts over
    assert liveness.failure(unready(), now=313) is None
    assert liveness.failure(unready(), now=600) is None


def test_liveness_never_fails_before_the_service_was_ready():
    liveness = Liveness(limit=300)
    for t in range(0, 10_000, 100):
        assert liveness.failure(no_worker(), now=t) is None
        assert liveness.failure(failing_golden(), now=t + 50) is None


def test_a_scale_to_zero_by_an_operator_is_not_a_failure():
    liveness = Liveness(limit=300)
    liveness.failure(ready(), now=0)
    assert liveness.failure(no_worker(), now=10) is None
    assert liveness.failure(no_worker(expected=0), now=100) is None  # scaled to zero
    assert liveness.failure(no_worker(expected=0), now=5000) is None
    assert liveness.failure(no_worker(), now=5001) is None  # scaled up again: the count starts here
    assert liveness.failure(no_worker(), now=5301) is None
    assert liveness.failure(no_worker(), now=5302)


def test_a_drain_pauses_liveness_and_a_zero_bound_turns_it_off():
    liveness = Liveness(limit=300)
    liveness.failure(ready(), now=0)
    assert liveness.failure(no_worker(), paused=True, now=10) is None
    assert liveness.failure(no_worker(), paused=True, now=1000) is None
    off = Liveness(limit=0)
    off.failure(ready(), now=0)
    assert off.failure(no_worker(), now=1) is None and off.failure(no_worker(), now=100_000) is None


def test_without_a_golden_record_the_service_is_never_ready(torchserve):
    readiness = Readiness(torchserve, golden=None)
    state = run(readiness, 0, 30)
    assert state.up and not state.ready and "no golden record" in state.golden_seen
