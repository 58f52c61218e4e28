"""The retrying nginx gateway: 5xx answers are retried, 4xx pass through, the config is validated."""

from __future__ import annotations

import time

import pytest
import requests

from serving.gateway import Gateway, render
from serving.server import free_port
from tests.conftest import ScriptedHandler, loopback_http_server

pytestmark = pytest.mark.integration


class FlakyUpstream(ScriptedHandler):
    """Answers by path: /fail-once fails its first attempt with 500, /hang-once never answers its
    first attempt, /always-500 always fails and /bad is always a 400."""

    attempts: dict[str, int] = {}

    def do_POST(self):
        body = self.read_body()
        count = self.attempts[self.path] = self.attempts.get(self.path, 0) + 1
        if self.path == "/hang-once" and count == 1:
            time.sleep(3)  # longer than the gateway's attempt timeout
            return
        if self.path == "/bad":
            status = 400
        elif self.path == "/always-500":
            status = 500
        else:
            status = 500 if count == 1 else 200
        self.answer(status, body if status == 200 else b'{"message": "Worker scaled down."}')


@pytest.fixture
def upstream():
    FlakyUpstream.attempts = {}
    with loopback_http_server(FlakyUpstream) as address:
        yield address


@pytest.fixture
def gateway(upstream, tmp_path):
    with Gateway(upstream, tmp_path / "gateway", free_port(), tries=3, attempt_timeout=1) as running:
        yield running


def test_a_failed_attempt_is_retried_and_the_body_resent(gateway):
    answer = requests.post(f"{gateway.url}/fail-once", data=b"i feel fine", timeout=10)
    assert answer.status_code == 200
    assert answer.content == b"i feel fine"
    assert FlakyUpstream.attempts["/fail-once"] == 2
    assert gateway.retried(answered=1) == 1


def test_an_unanswered_attempt_is_retried_after_the_attempt_timeout(gateway):
    answer = requests.post(f"{gateway.url}/hang-once", data=b"i feel fine", timeout=10)
    assert answer.status_code == 200
    assert answer.content == b"i feel fine"
    assert FlakyUpstream.attempts["/hang-once"] == 2
    assert gateway.retried(answered=1) == 1


def test_client_errors_pass_through_without_retry(gateway):
    answer = requests.post(f"{gateway.url}/bad", data=b"x", timeout=10)
    assert answer.status_code == 400
    assert FlakyUpstream.attempts["/bad"] == 1
    assert gateway.retried(answered=1) == 0


def test_attempts_are_bounded(gateway):
    answer = requests.post(f"{gateway.url}/always-500", data=b"x", timeout=10)
    assert answer.status_code == 500
    assert FlakyUpstream.attempts["/always-500"] == 3


@pytest.mark.parametrize(
    ("upstream_address", "listen", "tries", "attempt_timeout"),
    [
        ("127.0.0.1", "127.0.0.1:1", 3, 10),
        ("127.0.0.1:80", "nowhere", 3, 10),
        ("127.0.0.1:80", "127.0.0.1:1", 0, 10),
        ("127.0.0.1:80", "127.0.0.1:1", 3, 0),
    ],
)
def test_render_rejects_bad_settings(upstream_address, listen, tries, attempt_timeout, tmp_path):
    with pytest.raises(ValueError):
        render(upstream_address, listen, tmp_path, tries, attempt_timeout)


def test_render_lists_the_upstream_once_per_attempt(tmp_path):
    config = render("127.0.0.1:8080", "127.0.0.1:8090", tmp_path, tries=4)
    assert config.count("server 127.0.0.1:8080 max_fails=0;") == 4
    assert "listen 127.0.0.1:8090;" in config
    assert "@@" not in config
