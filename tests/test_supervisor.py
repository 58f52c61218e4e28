"""The stack's supervisor without TorchServe: key switches close the prediction route, and the
restart decision of ``serving run``. Readiness, TorchServe's token API and (in the
integration tests) TorchServe's inference API are stubbed; nginx is real where it runs."""

from __future__ import annotations

import itertools
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import requests

from serving.__main__ import watch
from serving.client import ManagementError
from serving.gateway import nginx_workers, wait_reloaded
from serving.health import HealthState
from serving.server import free_port
from serving.settings import GatewaySettings
from serving.stack import Stack
from tests.helpers import ScriptedHandler, loopback_http_server


def write_key_file(stack: Stack, inference_key: str, expires_in: float) -> None:
    expiry = (datetime.now(UTC) + timedelta(seconds=expires_in)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    entry = {"key": inference_key, "expiration time": expiry}
    keys = {"management": {"key": "m", "expiration time": expiry}, "inference": entry, "API": {"key": "api"}}
    path = stack.torchserve.client.key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    tmp.replace(path)


def make_stack(tmp_path, upstream: str | None = None, **kwargs) -> Stack:
    overrides = {"inference_address": f"http://{upstream}"} if upstream else None
    settings = GatewaySettings(port=free_port(), metrics_port=free_port(), attempt_timeout=2)
    stack = Stack(tmp_path / "store", tmp_path / "stack", settings, free_ports=True, ts_overrides=overrides, **kwargs)
    stack.readiness.state = HealthState(ready_workers=2, golden_ok=True)
    stack.readiness.check = lambda now=None: stack.readiness.state  # no TorchServe to ask
    stack.gateway.health_dir.mkdir(parents=True)
    stack.gateway.set_health(up=True, ready=True)
    return stack


def route_open(stack: Stack) -> bool:
    return (stack.gateway.health_dir / "up").exists()


@pytest.fixture
def renewing(tmp_path):
    """A stack whose TorchServe key is due for renewal; its token API stub records the route."""
    stack = make_stack(tmp_path)
    write_key_file(stack, "old-key", expires_in=60)  # a year's key with a minute left
    stack.gateway.upstream_key = stack.torchserve.keys["inference"]
    seen = []

    def rotate_key(api):
        seen.append(("rotate", api, route_open(stack)))
        write_key_file(stack, "new-key", expires_in=365 * 86400)
        return "new-key"

    update_keys = stack.gateway.update_keys

    def recording_update_keys(client_keys, upstream_key):
        seen.append(("update_keys", upstream_key, route_open(stack)))
        return update_keys(client_keys, upstream_key)

    stack.torchserve.client.rotate_key = rotate_key
    stack.gateway.update_keys = recording_update_keys
    return stack, seen


def test_renewing_torchserves_key_closes_the_route_until_the_gateway_has_the_new_one(renewing):
    stack, seen = renewing
    stack.supervise_once()
    assert seen == [("rotate", "inference", False), ("update_keys", "new-key", False)]
    assert stack.gateway.upstream_key == "new-key"
    assert route_open(stack) and (stack.gateway.health_dir / "ready").exists()  # reopened
    seen.clear()
    stack.supervise_once()  # the new key is not due: nothing closes
    assert ("rotate", "inference", False) not in seen and route_open(stack)


def test_a_key_renewed_elsewhere_is_handed_to_the_gateway_with_the_route_closed(renewing):
    stack, seen = renewing
    write_key_file(stack, "operator-key", expires_in=365 * 86400)  # an operator called /token
    stack.supervise_once()
    assert seen == [("update_keys", "operator-key", False)]
    assert stack.gateway.upstream_key == "operator-key" and route_open(stack)


def test_a_failed_renewal_reopens_the_route_and_is_not_retried_at_once(renewing):
    stack, seen = renewing

    def refuse(api):
        seen.append(("rotate", api, route_open(stack)))
        raise ManagementError("token API: 400 wrong API key")

    stack.torchserve.client.rotate_key = refuse
    with pytest.raises(ManagementError):
        stack.supervise_once()
    assert route_open(stack)
    stack.supervise_once()
    assert [s for s in seen if s[0] == "rotate"] == [("rotate", "inference", False)]


def test_a_drain_keeps_ready_down_after_a_key_switch(renewing):
    stack, _ = renewing
    stack._draining.set()
    stack.supervise_once()
    assert route_open(stack) and not (stack.gateway.health_dir / "ready").exists()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watched_stack(tmp_path, unready_exit: float = 300) -> tuple[Stack, Clock]:
    stack = make_stack(tmp_path, unready_exit=unready_exit)
    clock = Clock()
    stack.liveness.clock = clock
    stack.torchserve.process = SimpleNamespace(running=lambda: True)
    return stack, clock


def test_the_supervisor_asks_to_exit_only_past_the_bound_after_having_been_ready(tmp_path):
    stack, clock = watched_stack(tmp_path)
    assert stack.liveness_failure() is None  # ready at 0
    stack.readiness.state = HealthState(ready_workers=0, expected_workers=2)  # the workers are gone
    for clock.now in (1.0, 100.0, 301.0):
        assert stack.liveness_failure() is None
    clock.now = 302.0
    assert "no READY worker" in stack.liveness_failure()
    assert watch(stack, threading.Event(), poll=0.01) == 1  # run() returns non-zero


def test_the_supervisor_does_not_exit_before_the_bound_nor_when_never_ready(tmp_path):
    stack, clock = watched_stack(tmp_path)
    stack.readiness.state = HealthState(ready_workers=0, expected_workers=2)  # never ready: startup
    stopping = threading.Event()
    threading.Timer(0.3, stopping.set).start()
    clock.now = 10_000.0
    assert watch(stack, stopping, poll=0.01) == 0

    stack, clock = watched_stack(tmp_path / "2")
    assert stack.liveness_failure() is None  # ready at 0
    stack.readiness.state = HealthState(ready_workers=2, golden_ok=False, expected_workers=2)
    clock.now = 200.0
    stopping = threading.Event()
    threading.Timer(0.3, stopping.set).start()
    assert watch(stack, stopping, poll=0.01) == 0


def test_the_supervisor_does_not_exit_while_draining(tmp_path):
    stack, clock = watched_stack(tmp_path)
    assert stack.liveness_failure() is None
    stack._draining.set()
    stack.readiness.state = HealthState(ready_workers=0, expected_workers=2)
    clock.now = 10_000.0
    assert stack.liveness_failure() is None


# -- with the real nginx ----------------------------------------------------------------------


class OneKeyUpstream(ScriptedHandler):
    """TorchServe's inference API as far as keys go: only the newest key is accepted (400 otherwise)."""

    key = "old-key"

    def do_POST(self):
        self.read_body()
        if self.headers.get("Authorization") == f"Bearer {self.key}":
            self.answer(200, b'{"label": "joy"}')
        else:
            self.answer(400, b'{"code": 400, "message": "Token Authorization failed."}')


@pytest.mark.integration
def test_nginx_reload_is_seen_when_its_new_worker_has_taken_over(tmp_path):
    stack = make_stack(tmp_path, upstream=f"127.0.0.1:{free_port()}")
    stack.gateway.start()
    try:
        before = set(nginx_workers(stack.gateway))
        assert len(before) == 1
        assert not wait_reloaded(stack.gateway, before, timeout=0.3)  # no reload yet
        stack.gateway.update_keys(None, "another-key")
        assert wait_reloaded(stack.gateway, before, timeout=5)
        assert set(nginx_workers(stack.gateway)) - before
    finally:
        stack.gateway.stop()


def renew_under_load(tmp_path, upstream: type, answered: int = 8) -> tuple[Stack, list[tuple[int, str]]]:
    """A gateway in front of ``upstream`` (which accepts only its class's ``key``) under four
    clients, one connection per request (nginx's reload closes idle kept-alive connections, a race
    of any reload that is not what these tests are about); once ``answered`` answers are in,
    TorchServe's key is renewed, then ``answered`` more are awaited. Returns the stack and every
    answer as (status, error type)."""
    numbers = itertools.count()
    upstream.key = "old-key"
    with loopback_http_server(upstream) as address:
        stack = make_stack(tmp_path, upstream=address)
        write_key_file(stack, "old-key", expires_in=60)
        stack.gateway.upstream_key = "old-key"
        stack.gateway.start()

        def rotate_key(api):
            upstream.key = "new-key"  # TorchServe: the old key is invalid at once
            write_key_file(stack, "new-key", expires_in=365 * 86400)
            return "new-key"

        stack.torchserve.client.rotate_key = rotate_key
        answers: list[tuple[int, str]] = []
        stopping = threading.Event()

        def client():
            while not stopping.is_set():
                body = f"request {next(numbers)}".encode()  # names the request (SlowDyingUpstream)
                answer = requests.post(
                    f"{stack.url}/predictions/emotion", data=body, headers={"Connection": "close"}, timeout=30
                )
                answers.append((answer.status_code, answer.json().get("type", "") if answer.status_code >= 400 else ""))

        clients = [threading.Thread(target=client) for _ in range(4)]
        try:
            for thread in clients:
                thread.start()
            while len(answers) < answered:
                time.sleep(0.05)
            stack.supervise_once()  # renews the key
            served = len(answers)
            while len(answers) < served + answered:
                time.sleep(0.05)
        finally:
            stopping.set()
            for thread in clients:
                thread.join(30)
            stack.gateway.stop()
    return stack, answers


@pytest.mark.integration
def test_no_request_meets_a_replaced_torchserve_key_during_renewal(tmp_path):
    stack, answers = renew_under_load(tmp_path, OneKeyUpstream, answered=20)
    print({answer: answers.count(answer) for answer in set(answers)})
    assert stack.gateway.upstream_key == "new-key"
    assert answers.count((200, "")) > 20
    assert set(answers) <= {(200, ""), (503, "NotReady")}, {a: answers.count(a) for a in set(answers)}


class SlowDyingUpstream(ScriptedHandler):
    """Keys as ``OneKeyUpstream``, checked when a request arrives; every request takes a while, and
    the first attempt of every other request ends as TorchServe's 507 "worker died", which the
    gateway sends again (its body names the request)."""

    key = "old-key"
    seen: set[bytes] = set()
    lock = threading.Lock()

    def do_POST(self):
        body = self.read_body()
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            self.answer(400, b'{"code": 400, "message": "Token Authorization failed."}')
            return
        time.sleep(0.2)
        with self.lock:
            dies = body not in self.seen and int(body.split()[-1]) % 2 == 0
            self.seen.add(body)
        self.answer(507, b'{"code": 507, "message": "Worker died."}') if dies else self.answer(200, b"{}")


@pytest.mark.integration
def test_a_request_in_flight_at_a_renewal_is_not_retried_with_the_replaced_key(tmp_path):
    """The renewal waits, with the route closed, until the gateway has answered what it took: a
    request whose worker dies after the key changed would otherwise be sent again with the old key."""
    SlowDyingUpstream.seen = set()
    stack, answers = renew_under_load(tmp_path, SlowDyingUpstream)
    assert stack.gateway.upstream_key == "new-key"
    assert (200, "") in answers
    assert set(answers) <= {(200, ""), (503, "NotReady")}, {a: answers.count(a) for a in set(answers)}


class EchoUpstream(ScriptedHandler):
    def do_POST(self):
        self.answer(200, self.read_body())


@pytest.mark.integration
def test_during_the_drain_answers_close_their_connections_so_clients_move(tmp_path):
    with loopback_http_server(EchoUpstream) as address:
        stack = make_stack(tmp_path, upstream=address, drain=2.0)
        stack.torchserve.start = lambda **_: 0.0  # the scripted upstream stands in for TorchServe
        stack.start()
        stopping = threading.Thread(target=stack.stop)
        try:
            url = f"{stack.url}/predictions/emotion"
            before = requests.post(url, data=b"hi", timeout=5)
            assert before.status_code == 200 and before.headers["Connection"] == "keep-alive"
            stopping.start()
            deadline = time.monotonic() + 1.5  # within the drain
            while requests.get(f"{stack.url}/ready", timeout=5).status_code != 503:
                assert time.monotonic() < deadline
            answers = []
            while not answers or answers[-1].headers["Connection"] != "close":
                assert time.monotonic() < deadline, [a.headers["Connection"] for a in answers]
                answers.append(requests.post(url, data=b"hi", timeout=5))
            assert all(answer.status_code == 200 for answer in answers)  # still served
        finally:
            if stopping.ident is not None:
                stopping.join(timeout=15)
            stack.stop()


def test_the_supervisor_exits_when_the_gateway_dies(tmp_path):
    """Docker does not act on a failed HEALTHCHECK: the supervisor itself must exit for a restart."""
    stack, _ = watched_stack(tmp_path)
    stack.gateway.process = SimpleNamespace(running=lambda: False)
    assert watch(stack, threading.Event(), poll=0.01) == 1
    stack.gateway.process = SimpleNamespace(running=lambda: True)
    stopping = threading.Event()
    threading.Timer(0.2, stopping.set).start()
    assert watch(stack, stopping, poll=0.01) == 0


def test_the_gateway_waits_for_its_longest_request_before_it_is_killed(tmp_path):
    from serving.settings import RETRY_MARGIN, response_timeout

    assert GatewaySettings(attempt_timeout=7).longest_request() == 3 * 7 + RETRY_MARGIN
    assert GatewaySettings().longest_request() == 3 * response_timeout() + RETRY_MARGIN
    from serving.gateway import Gateway

    gateway = Gateway("127.0.0.1:9", tmp_path / "gateway", GatewaySettings(attempt_timeout=4))
    stopped = []
    gateway.process = SimpleNamespace(stop=lambda timeout, sig: stopped.append(timeout))
    gateway.stop()
    assert stopped == [3 * 4 + RETRY_MARGIN + 5]
