"""The nginx gateway against a scripted upstream: what it retries, refuses, rewrites and reports."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.access_log import AccessLog
from serving.client import PROBE_HEADER
from serving.gateway import Gateway, attempts, client_keys_map, render
from serving.server import free_port
from serving.settings import RETRY_MARGIN, GatewaySettings
from tests.helpers import ScriptedHandler, loopback_http_server

pytestmark = pytest.mark.integration

KEY = "gateway-key_1"


TEXT_TOO_LONG = b'{"code": 413, "type": "TextTooLong", "message": "the text has 2001 characters; the limit is 2000"}'
MODEL_NOT_FOUND = b'{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: scaled-down"}'


class ScriptedUpstream(ScriptedHandler):
    """Answers by model name: ``fail-once`` fails its first attempt with 500, ``died-once`` with
    TorchServe's 507, ``hang-once`` never answers its first attempt, ``busy`` is always a
    queue-full 503, ``always-500`` always fails, ``bad`` is always a 400; ``always-507`` is
    always a 507, ``died-then-drop`` and ``died-then-hang`` a 507 and then a closed connection or
    no answer, ``always-hang`` never answers, ``fails-then-dies`` is 500, 500, 507 and then 500;
    ``scaled-down`` a 500 and then TorchServe's 404 (the model unregistered), ``missing`` always
    that 404, ``too-long`` the handler's 413; ``slow`` echoes after half a second, others at once.
    Every answer carries the Authorization and Content-Type headers the upstream received."""

    attempts: dict[str, int] = {}
    paths: list[str] = []  # the request targets as received

    def do_POST(self):
        body = self.read_body()
        self.paths.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        count = self.attempts[name] = self.attempts.get(name, 0) + 1
        if (name == "hang-once" and count == 1) or name == "always-hang" or (name == "died-then-hang" and count > 1):
            time.sleep(3)  # longer than the gateway's attempt timeout
            return
        if name == "slow":
            time.sleep(0.5)  # shorter than the gateway's attempt timeout
        if name == "died-then-drop" and count > 1:
            self.close_connection = True  # closed without an answer
            return
        status = {"bad": 400, "always-500": 500, "busy": 503, "always-507": 507, "fails-then-dies": 500}.get(name, 200)
        status = {"missing": 404, "too-long": 413, "scaled-down": 404}.get(name, status)
        if count == 1 and name in ("fail-once", "died-once", "died-then-drop", "died-then-hang", "scaled-down"):
            status = 500 if name in ("fail-once", "scaled-down") else 507
        if name == "fails-then-dies" and count == 3:
            status = 507
        self.send_response(status)
        payload = {200: body, 404: MODEL_NOT_FOUND, 413: TEXT_TOO_LONG}.get(status, b'{"message": "scripted failure"}')
        self.send_header("X-Seen-Authorization", self.headers.get("Authorization", ""))
        self.send_header("X-Seen-Content-Type", self.headers.get("Content-Type", ""))
        self.send_header("X-Seen-Probe", self.headers.get(PROBE_HEADER, "absent"))
        self.send_header("X-Seen-Request-ID", self.headers.get("X-Request-ID", "absent"))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def upstream():
    ScriptedUpstream.attempts = {}
    ScriptedUpstream.paths = []
    with loopback_http_server(ScriptedUpstream) as address:
        yield address


def start_gateway(upstream: str, workdir, **settings) -> Gateway:
    config = GatewaySettings(port=free_port(), metrics_port=free_port(), attempt_timeout=1, **settings)
    gateway = Gateway(upstream, workdir, config, client_keys=[KEY], upstream_key="torchserve-key")
    gateway.start()
    gateway.set_health(up=True, ready=True)
    return gateway


@pytest.fixture
def gateway(upstream, tmp_path):
    running = start_gateway(upstream, tmp_path / "gateway")
    yield running
    running.stop()


def post(gateway: Gateway, model: str, body=b"i feel fine", key: str | None = KEY, timeout: float = 10, **headers):
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{gateway.url}/predictions/{model}", data=body, headers={**auth, **headers}, timeout=timeout)


VALID_IDS = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=64)
INVALID_IDS = st.one_of(
    st.text(alphabet="abc019-", min_size=65, max_size=80),  # too long
    st.text(alphabet='ab c/:;"{}', min_size=1, max_size=20).filter(
        lambda t: t == t.strip() and not re.fullmatch(r"[a-c]+", t)
    ),
)


@given(
    sent=st.one_of(VALID_IDS, INVALID_IDS, st.none()),
    # answered upstream (200, the handler's 400, a queue-full 503) or by the gateway (401)
    route=st.sampled_from([("emotion", KEY), ("bad", KEY), ("busy", KEY), ("emotion", None)]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_answer_carries_one_request_id_in_header_body_upstream_and_access_log(gateway, sent, route):
    model, key = route
    headers = {} if sent is None else {"X-Request-ID": sent}

    def logged(rid: str) -> int:
        return sum(f" request_id={rid} version=" in line for line in gateway.log_lines())

    before = logged(sent) if sent else 0
    answer = post(gateway, model, key=key, **headers)
    rid = answer.headers["X-Request-ID"]
    if sent is not None and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", sent):
        assert rid == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid  # nginx's own
        before = 0
    if key is None:  # the gateway answered: its JSON has the id, and no upstream saw the request
        assert answer.status_code == 401 and answer.json()["request_id"] == rid
        assert "X-Seen-Request-ID" not in answer.headers
    else:  # the upstream (the handler) got the same id
        assert answer.headers["X-Seen-Request-ID"] == rid
    deadline = time.monotonic() + 5  # nginx logs a request after its answer
    while logged(rid) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged(rid) == before + 1


@pytest.mark.parametrize("model", ["fail-once", "died-once", "hang-once"])
def test_a_dead_removed_or_silent_worker_is_retried_and_the_body_resent(gateway, model):
    answer = post(gateway, model)
    assert answer.status_code == 200
    assert answer.content == b"i feel fine"
    assert ScriptedUpstream.attempts[model] == 2
    assert gateway.retried(answered=1) == 1


@pytest.mark.parametrize("model", ["fail-once", "died-once"])
def test_a_large_body_goes_to_disk_and_is_resent_whole(gateway, model):
    """Bodies past 16 KiB are buffered in the work folder, not in memory, and a retry resends them."""
    body = bytes(range(256)) * 3000  # 768 KiB, under the 1 MiB limit
    answer = post(gateway, model, body=body, timeout=30)
    assert answer.status_code == 200 and answer.content == body
    assert ScriptedUpstream.attempts[model] == 2
    assert "client_body_buffer_size 16k;" in gateway.config


def test_a_queue_full_refusal_is_not_retried_and_says_when_to_retry(gateway):
    answer = post(gateway, "busy")
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    assert ScriptedUpstream.attempts["busy"] == 1


def test_client_errors_pass_through_without_retry(gateway):
    answer = post(gateway, "bad")
    assert answer.status_code == 400
    assert ScriptedUpstream.attempts["bad"] == 1
    assert "Retry-After" not in answer.headers


def test_attempts_are_bounded(gateway):
    assert post(gateway, "always-500").status_code == 500
    assert ScriptedUpstream.attempts["always-500"] == 3


@pytest.mark.parametrize("model", ["always-507", "died-then-drop", "died-then-hang"])
def test_a_retry_after_a_dead_worker_that_fails_too_is_a_json_503(gateway, model):
    answer = post(gateway, model)
    assert answer.status_code == 503 and answer.json()["type"] == "Unavailable"
    assert answer.headers["Retry-After"] == "1"
    assert ScriptedUpstream.attempts[model] <= 3  # the 507, one retry (and a reconnect if it was idle)


def test_a_retry_after_a_dead_worker_is_one_attempt(gateway):
    assert post(gateway, "fails-then-dies").status_code == 500  # TorchServe's last answer, passed on
    assert ScriptedUpstream.attempts["fails-then-dies"] == 4  # tries, then one after the 507


def test_retries_end_once_the_attempt_timeout_and_its_margin_are_over(upstream, tmp_path):
    gateway = start_gateway(upstream, tmp_path / "gateway", tries=10)
    try:
        answer = post(gateway, "always-hang", timeout=60)
        assert answer.status_code == 503 and answer.json()["type"] == "Unavailable"
        # attempt_timeout 1 s: no retry starts after 1 + RETRY_MARGIN s, so fewer than the 10 tries
        # are made, whatever the machine's speed (each hanging try takes its whole timeout).
        window = 1 + RETRY_MARGIN
        assert 2 <= ScriptedUpstream.attempts["always-hang"] <= window + 1
    finally:
        gateway.stop()


def test_the_served_model_unregistered_mid_request_is_a_503_not_ready(upstream, tmp_path):
    gateway = start_gateway(upstream, tmp_path / "gateway", model="scaled-down")
    try:
        answer = post(gateway, "scaled-down")
        assert answer.status_code == 503 and answer.json()["type"] == "NotReady"
        assert answer.headers["Retry-After"] == "1"
        assert ScriptedUpstream.attempts["scaled-down"] == 2
        # Another model's name: TorchServe's 404 stays a 404, with no retry.
        other = post(gateway, "missing")
        assert other.status_code == 404 and other.json()["type"] == "ModelNotFound"
        assert "Retry-After" not in other.headers
        assert ScriptedUpstream.attempts["missing"] == 1
    finally:
        gateway.stop()


def test_the_handlers_text_too_long_is_not_taken_for_a_body_too_large(gateway):
    answer = post(gateway, "too-long")
    assert answer.status_code == 413 and answer.json()["type"] == "TextTooLong"
    assert "2000" in answer.json()["message"]  # the handler's limit (model-config.yaml)
    assert "Retry-After" not in answer.headers
    too_large = post(gateway, "too-long", body=b"x" * (2**20 + 1))
    assert too_large.status_code == 413 and too_large.json()["type"] == "BodyTooLarge"
    # A body without its length is not read (it could not be held to the request deadline).
    chunked = post(gateway, "too-long", body=iter([b"x" * 2**19] * 3))
    assert chunked.status_code == 411 and chunked.json()["type"] == "LengthRequired"
    assert ScriptedUpstream.attempts["too-long"] == 1


def test_clients_need_a_gateway_key_and_never_see_torchserves(gateway):
    refused = post(gateway, "echo", key=None)
    assert refused.status_code == 401 and refused.json()["type"] == "Unauthorized"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert post(gateway, "echo", key="wrong").status_code == 401
    answer = post(gateway, "echo")
    assert answer.status_code == 200
    assert answer.headers["X-Seen-Authorization"] == "Bearer torchserve-key"
    assert ScriptedUpstream.attempts == {"echo": 1}


def test_keys_change_without_a_restart(gateway):
    gateway.update_keys(["new-key", KEY], "rotated")
    time.sleep(0.5)  # graceful reload
    assert post(gateway, "echo", key="new-key").headers["X-Seen-Authorization"] == "Bearer rotated"
    gateway.update_keys(["new-key"], "rotated")
    time.sleep(0.5)
    assert post(gateway, "echo").status_code == 401
    assert post(gateway, "echo", key="new-key").status_code == 200


def test_a_drain_has_every_answer_close_its_connection(gateway):
    """Clients on kept-alive connections reconnect during a drain (to another replica, behind a
    load balancer) instead of sending requests until nginx's stop closes their connections."""
    from serving.gateway import nginx_workers, wait_reloaded

    with requests.Session() as session:
        before = session.post(f"{gateway.url}/predictions/echo", data=b"hi", headers={"Authorization": f"Bearer {KEY}"})
        assert before.status_code == 200 and before.headers["Connection"] == "keep-alive"
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(post, gateway, "slow")
        time.sleep(0.2)  # the request has reached the upstream
        workers = set(nginx_workers(gateway))
        assert gateway.drain()
        assert not gateway.drain()  # once
        assert wait_reloaded(gateway, workers)
        assert in_flight.result(timeout=10).status_code == 200  # answered through the graceful reload
    for _ in range(3):
        answer = post(gateway, "echo")
        assert answer.status_code == 200 and answer.headers["Connection"] == "close"
    workers = set(nginx_workers(gateway))
    gateway.update_keys([KEY], "rotated")  # a reload during the drain keeps it
    assert wait_reloaded(gateway, workers)
    answer = post(gateway, "echo")
    assert answer.headers["X-Seen-Authorization"] == "Bearer rotated" and answer.headers["Connection"] == "close"


@pytest.mark.parametrize("model", ["echo", "fail-once", "died-once"])  # first attempts and both retry paths
def test_a_client_cannot_pass_its_request_off_as_the_readiness_probe(gateway, model):
    answer = post(gateway, model, **{PROBE_HEADER: "readiness"})
    assert answer.status_code == 200
    assert answer.headers["X-Seen-Probe"] == "absent"


@pytest.mark.parametrize(
    ("sent", "seen"),
    [
        ("application/x-www-form-urlencoded", "text/plain; charset=utf-8"),
        ("Application/X-WWW-Form-Urlencoded ", "text/plain; charset=utf-8"),
        ("application/x-www-form-urlencoded; charset=ISO-8859-1", "text/plain; charset=ISO-8859-1"),
        ("application/x-www-form-urlencoded;charset=latin-1", "text/plain;charset=latin-1"),
        # Not the form type, only a name that starts like it: passed on as sent.
        ("application/x-www-form-urlencodedx", "application/x-www-form-urlencodedx"),
    ],
)
def test_curl_default_form_body_is_read_as_text_in_its_charset(gateway, sent, seen):
    answer = post(gateway, "echo", body=b"i feel great", **{"Content-Type": sent})
    assert answer.status_code == 200
    assert answer.headers["X-Seen-Content-Type"] == seen
    assert answer.content == b"i feel great"


def test_health_gates_predictions_and_readiness(gateway):
    assert requests.get(f"{gateway.url}/ready", timeout=5).status_code == 200
    assert requests.get(f"{gateway.url}/live", timeout=5).status_code == 200
    gateway.set_health(up=True, ready=False)
    assert requests.get(f"{gateway.url}/ready", timeout=5).status_code == 503
    assert post(gateway, "echo").status_code == 200  # draining: still served
    gateway.set_health(up=False, ready=False)
    refused = post(gateway, "echo")
    assert refused.status_code == 503 and refused.json()["type"] == "NotReady"
    assert refused.headers["Retry-After"] == "1"
    assert "echo" not in ScriptedUpstream.attempts or ScriptedUpstream.attempts["echo"] == 1


def test_an_upstream_that_is_down_is_a_503_with_retry_after(tmp_path):
    gateway = start_gateway(f"127.0.0.1:{free_port()}", tmp_path / "gateway")
    try:
        answer = post(gateway, "echo")
        assert answer.status_code == 503 and answer.json()["type"] == "Unavailable"
        assert answer.headers["Retry-After"] == "1"
    finally:
        gateway.stop()


def test_refusals_are_json_and_other_paths_are_not_served(gateway):
    too_large = post(gateway, "echo", body=b"x" * (2**20 + 1))
    assert too_large.status_code == 413 and too_large.json()["type"] == "BodyTooLarge"
    for method, path in (("POST", "/explanations/emotion"), ("GET", "/ping"), ("GET", "/models"), ("POST", "/")):
        answer = requests.request(method, f"{gateway.url}{path}", timeout=5)
        assert answer.status_code == 404 and answer.json()["type"] == "NotFound"
    assert requests.get(f"{gateway.url}/predictions/echo", timeout=5).status_code == 405
    assert ScriptedUpstream.attempts == {}


def test_a_client_over_its_rate_is_refused_with_429(upstream, tmp_path):
    gateway = start_gateway(upstream, tmp_path / "gateway", rate=1, burst=1)
    try:
        statuses = [post(gateway, "echo").status_code for _ in range(5)]
        assert statuses[0] == 200 and 429 in statuses
        refused = post(gateway, "echo")
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["type"] == "TooManyRequests"
    finally:
        gateway.stop()


@pytest.mark.parametrize("trusted", [(), ("127.0.0.1",)])
def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(upstream, tmp_path, trusted):
    """Every request comes from the proxy's address; only a trusted proxy's X-Forwarded-For counts."""
    gateway = start_gateway(upstream, tmp_path / "gateway", rate=1, burst=1, trusted_proxies=trusted)
    try:
        # a client may put anything first in the header; the proxy appends the address it saw
        first = {"X-Forwarded-For": "203.0.113.9, 198.51.100.1"}
        assert 429 in [post(gateway, "echo", **first).status_code for _ in range(5)]
        other = post(gateway, "echo", **{"X-Forwarded-For": "203.0.113.9, 198.51.100.2"}).status_code
        assert other == (200 if trusted else 429)
    finally:
        gateway.stop()


def test_one_key_has_its_own_limit_whatever_addresses_it_comes_from(upstream, tmp_path):
    """Clients behind a trusted proxy, each within its address's limit, share their key's."""
    other = "another-gateway-key_" + "x" * 20
    config = GatewaySettings(
        port=free_port(), metrics_port=free_port(), attempt_timeout=1, key_rate=1, key_burst=1,
        trusted_proxies=("127.0.0.1",),
    )  # fmt: skip
    gateway = Gateway(upstream, tmp_path / "gateway", config, client_keys=[KEY, other], upstream_key="k")
    gateway.start()
    gateway.set_health(up=True, ready=True)
    try:
        addresses = [f"198.51.100.{i}" for i in range(1, 6)]
        statuses = [post(gateway, "echo", **{"X-Forwarded-For": a}).status_code for a in addresses]
        assert statuses[0] == 200 and 429 in statuses  # one address each, one key for all
        assert post(gateway, "echo", key=other, **{"X-Forwarded-For": "198.51.100.9"}).status_code == 200
        assert "limit_req zone=per_key_rate burst=1 nodelay;" in gateway.config
    finally:
        gateway.stop()


def test_a_trusted_proxy_must_be_an_address_or_network():
    assert GatewaySettings(trusted_proxies=("127.0.0.1", "10.0.0.0/8", "::1")).trusted_proxies
    with pytest.raises(ValueError, match="trusted proxy"):
        GatewaySettings(trusted_proxies=("127.0.0.1; allow all",))


def test_access_log_counts_rotates_and_renders_metrics(gateway):
    for model in ("echo", "died-once", "bad"):
        post(gateway, model)
    log = AccessLog(gateway.access_log, max_bytes=1, backups=2)
    gateway.retried(answered=3)
    assert log.poll() == 3
    assert log.responses == {"200": 2, "400": 1}
    assert (log.attempts, log.retried) == (4, 1)
    assert log.rotate_if_needed()
    gateway.reopen_logs()
    post(gateway, "echo")
    deadline = time.monotonic() + 5
    while log.poll() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.responses["200"] == 3
    assert gateway.access_log.with_name("access.log.1").exists()
    text = log.metrics(ready=True, up=True, ready_workers=2)
    assert 'emotion_gateway_responses_total{code="400"} 1' in text
    assert "emotion_gateway_upstream_attempts_total 5" in text


def test_attempts_parsing():
    assert attempts('"POST /predictions/x HTTP/1.1" 200 upstream=[500, 200] seconds=0') == 2
    assert attempts('"POST /predictions/x HTTP/1.1" 200 upstream=[507 : 200] seconds=0') == 2
    assert attempts('"GET /ready HTTP/1.1" 503 upstream=[-] seconds=0') == 0


def test_render_validates_and_fills_every_placeholder(tmp_path):
    settings = GatewaySettings(port=8090, metrics_port=8093, tries=4, attempt_timeout=7)
    config = render("127.0.0.1:8085", tmp_path, settings)
    assert config.count("server 127.0.0.1:8085 max_fails=0;") == 4
    assert "listen 127.0.0.1:8090;" in config and "listen 127.0.0.1:8093;" in config
    assert "proxy_read_timeout 7s;" in config
    assert config.count(f"proxy_next_upstream_timeout {7 + RETRY_MARGIN}s;") == 2
    assert "if ($predict_uri = /predictions/emotion)" in config
    assert "@@" not in config
    # Every JSON error answer carries its message as OIP's "error" too.
    messages = re.findall(r'"message": ("(?:[^"\\]|\\.)*")(, "error": ("(?:[^"\\]|\\.)*"))?', config)
    assert len(messages) >= 20 and all(error == message for message, _, error in messages)
    with pytest.raises(ValueError):
        render("nowhere", tmp_path, settings)
    for bad in ({"tries": 0}, {"port": 0}, {"attempt_timeout": 0}, {"rate": 0}, {"model": "a b"}, {"model": ""}):
        with pytest.raises(ValueError):
            GatewaySettings(**bad)
    assert "default 1;" in client_keys_map(None)
    assert "default 0;" in client_keys_map(["k"])


def test_the_scheme_is_case_insensitive_and_the_key_is_not():
    (pattern,) = re.findall(r'"~(.*)" 1;', client_keys_map([KEY]))
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert re.search(pattern, f"{scheme} {KEY}")
    for wrong in (KEY.upper(), KEY.swapcase(), KEY + "x", KEY[:-1]):
        assert not re.search(pattern, f"Bearer {wrong}")


def test_the_stack_tells_the_gateway_which_model_it_serves(tmp_path):
    from serving.stack import Stack

    stack = Stack(tmp_path / "store", tmp_path / "work", models="other=other.mar", model="other", free_ports=True)
    assert stack.gateway.settings.model == "other"


def test_with_no_valid_key_every_request_is_refused(upstream, tmp_path):
    # An empty key list is "no key is valid" (fail closed), unlike None ("keys off").
    assert "default 1" not in client_keys_map([]) and "default 0" in client_keys_map([])
    config = GatewaySettings(port=free_port(), metrics_port=free_port(), attempt_timeout=1)
    gateway = Gateway(upstream, tmp_path / "gateway", config, client_keys=[], upstream_key="torchserve-key")
    gateway.start()
    gateway.set_health(up=True, ready=True)
    try:
        for key in (KEY, "anything", None):
            assert post(gateway, "echo", key=key).status_code == 401
        assert "echo" not in ScriptedUpstream.attempts
    finally:
        gateway.stop()


def test_the_rendered_key_files_are_the_owners_only(gateway):
    assert stat.S_IMODE(gateway.workdir.stat().st_mode) == 0o700
    assert gateway.update_keys(["another-key"], "another-torchserve-key")  # rewritten: still private
    for name in ("client_keys.conf", "upstream_auth.conf"):
        assert stat.S_IMODE((gateway.workdir / name).stat().st_mode) == 0o600, name


def test_every_answer_forbids_type_sniffing(gateway):
    answers = [
        requests.get(f"{gateway.url}/live", timeout=5),
        requests.get(f"{gateway.url}/ready", timeout=5),
        post(gateway, "echo"),
        post(gateway, "echo", key=None),
        requests.get(f"{gateway.url}/ping", timeout=5),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 401, 404]
    assert all(a.headers.get("X-Content-Type-Options") == "nosniff" for a in answers)


def test_the_access_log_records_the_path_without_its_query(gateway):
    requests.post(
        f"{gateway.url}/predictions/echo?api_key=s3cret-value", data=b"hi", headers={"Authorization": f"Bearer {KEY}"}
    )
    requests.post(f"{gateway.url}/predictions/echo?token=another-s3cret", data=b"hi")  # 401: logged too
    # nginx logs a request once its answer is sent: the client may read the log first
    deadline = time.monotonic() + 5
    while len(lines := [line for line in gateway.log_lines() if "/predictions/echo" in line]) < 2:
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    assert len(lines) == 2 and all('"POST /predictions/echo HTTP/1.1" ' in line for line in lines)
    assert not any("s3cret" in line for line in gateway.log_lines())


@pytest.mark.parametrize(
    "target",
    [
        "/ping/../predictions/echo",  # normalised to the route, forwarded as /ping
        "/x/../predictions/echo",
        "//predictions/echo",
        "/predictions//echo",
        "/predictions/./echo",
        "/predictions/echo/.",
        "/predictions/%65cho",  # percent-encoding of a plain letter
        "/predictions/echo?x=1",
        "/predictions/echo?",
        "/predictions/echo%3Fx=1",
        "/predictions/echo;x=1",
    ],
)
def test_only_the_route_as_written_reaches_torchserve(gateway, target):
    # http.client sends the request target exactly as given (requests would normalise some).
    connection = http.client.HTTPConnection("127.0.0.1", gateway.settings.port, timeout=10)
    try:
        connection.request("POST", target, body=b"i feel fine", headers={"Authorization": f"Bearer {KEY}"})
        answer = connection.getresponse()
        body = json.loads(answer.read())
    finally:
        connection.close()
    assert answer.status in (400, 404), (target, answer.status, body)
    assert body["type"] in ("InvalidPath", "NotFound") and body["message"]
    assert ScriptedUpstream.paths == []  # nothing was forwarded
    assert post(gateway, "echo").status_code == 200 and ScriptedUpstream.paths == ["/predictions/echo"]


def raw_exchange(gateway: Gateway, data: bytes) -> tuple[int, dict, bytes]:
    """Send ``data`` as is on a new connection; (status, headers, body) of the answer.

    nginx answers an oversized request before reading all of it and closes; the unread bytes
    can make the kernel reset the connection before the client has read the answer (the client's
    race, not the server's), so an exchange that received nothing is made again, at most 3 times.
    """
    import socket

    received = b""
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", gateway.settings.port), timeout=10) as sock:
            try:
                sock.sendall(data)
                while chunk := sock.recv(65536):
                    received += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
        if b"\r\n\r\n" in received:
            break
        received = b""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    "data, status, kind",
    [
        (b"GARBAGE\r\n\r\n", 400, "BadRequest"),
        (b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "BadRequest"),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URITooLong"),
        (b"GET /live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 431, "HeaderTooLarge"),
        (
            b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            400,
            "UnsupportedTransferEncoding",
        ),
        (b"GET /live HTTP/2.0\r\nHost: x\r\n\r\n", 400, "UnsupportedHTTPVersion"),
    ],
)
def test_requests_nginx_cannot_read_get_json_errors(gateway, data, status, kind):
    got, headers, body = raw_exchange(gateway, data)
    assert got == status, body[:300]
    assert json.loads(body)["type"] == kind and headers["Content-Type"].startswith("application/json")
    assert post(gateway, "echo").status_code == 200  # the next good request is answered


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP", "gzip, identity", "x-unknown"])
def test_a_compressed_body_is_refused_before_torchserve(gateway, encoding):
    import gzip

    answer = post(gateway, "echo", body=gzip.compress(b"i feel fine"), **{"Content-Encoding": encoding})
    assert answer.status_code == 415 and answer.json()["type"] == "UnsupportedContentEncoding"
    assert ScriptedUpstream.paths == []
    assert post(gateway, "echo", **{"Content-Encoding": "identity"}).status_code == 200


def test_feedback_is_keyed_limited_on_its_own_and_reaches_the_feedback_service(upstream, tmp_path):
    from serving.feedback import FeedbackStore
    from serving.feedback_service import FeedbackServer

    (tmp_path / "logs").mkdir()
    service = FeedbackServer(FeedbackStore(tmp_path / "feedback.sqlite", ["joy", "fear"], tmp_path / "logs")).start()
    gateway = start_gateway(
        upstream, tmp_path / "gateway", feedback_port=service.port, feedback_rate=1, feedback_burst=2
    )
    url = f"{gateway.url}/feedback"
    item = {"request_id": "never-served", "label": "joy"}
    try:
        refused = requests.post(url, json=item, timeout=10)
        assert refused.status_code == 401 and refused.json()["request_id"] == refused.headers["X-Request-ID"]
        assert requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 405
        auth = {"Authorization": f"Bearer {KEY}", "X-Request-ID": "fb-1"}
        answer = requests.post(url, json=item, headers=auth, timeout=10)
        assert answer.status_code == 404 and answer.json()["result"] == "unknown"  # the service's own answer
        assert answer.headers["X-Request-ID"] == "fb-1"
        flood = [requests.post(url, json=item, headers=auth, timeout=10) for _ in range(10)]
        limited = [a for a in flood if a.status_code == 429]  # past its own rate and burst
        assert limited and limited[0].headers["Retry-After"] and limited[0].json()["type"] == "TooManyRequests"
        time.sleep(2)  # the bucket has room again
        huge = requests.post(url, data=b"[" + b" " * (10 << 20) + b"]", headers=auth, timeout=30)
        assert huge.status_code == 413 and huge.json()["type"] == "BodyTooLarge"  # refused before the service
        assert post(gateway, "emotion").status_code == 200  # predictions have their own limits
        service.stop()
        time.sleep(3)  # the rate's bucket empties (1 per second)
        gone = requests.post(url, json=item, headers=auth, timeout=10)
        assert gone.status_code == 503 and gone.json()["type"] == "Unavailable"
    finally:
        gateway.stop()


def test_without_a_feedback_service_the_route_is_a_404(gateway):
    answer = requests.post(f"{gateway.url}/feedback", json={}, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert answer.status_code == 404 and answer.json()["type"] == "NotFound"


# Requests a client can send without a valid key or without reaching the model: each is answered
# by the gateway alone, before the upstream, and each must count against the client's limits.
UNCHECKED_REQUESTS = {
    "no key": ("POST", "/predictions/echo", {}),
    "a wrong key": ("POST", "/predictions/echo", {"Authorization": "Bearer " + "w" * 40}),
    "a wrong method": ("GET", "/predictions/echo", {"Authorization": f"Bearer {KEY}"}),
    "a path as not written": ("POST", "/predictions/echo?key=1", {"Authorization": f"Bearer {KEY}"}),
    "a compressed body": ("POST", "/predictions/echo", {"Authorization": f"Bearer {KEY}", "Content-Encoding": "gzip"}),
    "no such path": ("GET", "/models", {}),
    "an internal path": ("GET", "/_refuse/401", {}),
    "an error page": ("GET", "/_error/400", {}),
    "the shadow's path": ("POST", "/_shadow", {"Authorization": f"Bearer {KEY}"}),
    "liveness": ("GET", "/live", {}),
    "readiness": ("GET", "/ready", {}),
    "feedback without a key": ("POST", "/feedback", {}),
}


@pytest.mark.parametrize("name", sorted(UNCHECKED_REQUESTS))
def test_refusals_and_health_checks_count_against_the_clients_limits(upstream, tmp_path, name):
    """A refusal is answered after the limits: a client over its rate gets a 429 for it too."""
    method, path, headers = UNCHECKED_REQUESTS[name]
    gateway = start_gateway(upstream, tmp_path / "gateway", rate=1, burst=2)
    try:
        with requests.Session() as session:
            answers = [
                session.request(method, gateway.url + path, headers=headers, data=b"x", timeout=5) for _ in range(8)
            ]
        first = answers[0]
        assert first.status_code != 429 and first.headers["Content-Type"].startswith("application/json")
        limited = [answer for answer in answers if answer.status_code == 429]
        assert len(limited) >= 4, [answer.status_code for answer in answers]
        assert all(answer.json()["type"] == "TooManyRequests" for answer in limited)
        assert all(answer.headers["Retry-After"] == "1" for answer in limited)
        # every other answer is the first one's kind: nothing but the limit changed it
        assert {answer.status_code for answer in answers} == {first.status_code, 429}
        assert ScriptedUpstream.attempts == {}
    finally:
        gateway.stop()


def test_many_connections_refused_by_the_gateway_are_capped_per_client(upstream, tmp_path):
    """A client's unauthorised requests in flight count against its connection limit."""
    gateway = start_gateway(upstream, tmp_path / "gateway", connections=2)
    try:

        def stalled(sock):
            # headers complete, the body stalled: each such request holds its connection
            sock.sendall(
                b"POST /predictions/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Length: 10\r\n\r\n"
            )

        import socket

        held = [socket.create_connection(("127.0.0.1", gateway.settings.port), timeout=10) for _ in range(2)]
        try:
            for sock in held:
                stalled(sock)
            time.sleep(0.5)
            answer = requests.get(f"{gateway.url}/models", timeout=5)
            assert answer.status_code == 429 and answer.json()["type"] == "TooManyRequests"
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.5)
        assert requests.get(f"{gateway.url}/live", timeout=5).status_code == 200
    finally:
        gateway.stop()


def drip(gateway: Gateway, head: bytes, pieces: list[bytes], every: float) -> tuple[float, bytes]:
    """Send ``head``, then ``pieces`` one at a time ``every`` seconds apart (as long as the gateway
    reads); (seconds until the gateway answered or closed, what it answered)."""
    import socket

    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", gateway.settings.port), timeout=60) as sock:
        try:
            sock.sendall(head)
            for piece in pieces:
                time.sleep(every)
                sock.sendall(piece)
            sock.settimeout(60)
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not received:
            # the answer may be waiting behind the bytes the gateway did not read
            with contextlib.suppress(OSError):
                sock.settimeout(1)
                received = sock.recv(65536)
    return time.monotonic() - started, received


@pytest.mark.parametrize("length, every", [(40, 0.2), (4000, 0.5)])
def test_a_body_sent_slowly_is_cut_at_the_request_deadline(upstream, tmp_path, length, every):
    """However steadily a client sends (each byte well within the per-read timeout), a body not
    whole by the deadline is a 408, and the upstream never sees the request."""
    gateway = start_gateway(upstream, tmp_path / "gateway", request_deadline=3)
    try:
        head = (
            b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % length
        )
        seconds, answer = drip(gateway, head, [b"x"] * 40, every)
        assert seconds < 3 + 2 * every + 2, seconds  # the deadline, the read under way, a margin
        if answer:
            status, _, body = answer.partition(b"\r\n\r\n")
            assert status.split()[1] == b"408" and json.loads(body)["type"] == "RequestTimeout"
        assert ScriptedUpstream.attempts == {}
        assert post(gateway, "echo").status_code == 200  # the next good request is answered
    finally:
        gateway.stop()


def test_a_body_sent_in_pieces_within_the_deadline_is_read_whole(upstream, tmp_path):
    gateway = start_gateway(upstream, tmp_path / "gateway", request_deadline=5)
    try:
        pieces = [b"i feel ", b"fine ", b"today"]
        head = (
            b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(b"".join(pieces))
        )
        _, answer = drip(gateway, head, pieces, 0.5)
        assert answer.split()[1] == b"200" and answer.endswith(b"i feel fine today")
    finally:
        gateway.stop()


def test_headers_sent_slowly_are_cut_at_the_header_timeout(gateway):
    """nginx's header timeout counts from the first byte: dripped header lines do not extend it."""
    head = b"GET /live HTTP/1.1\r\n"
    seconds, _ = drip(gateway, head, [b"X-Drip-%d: y\r\n" % i for i in range(40)], 0.5)
    assert seconds < 10 + 3, seconds
    assert requests.get(f"{gateway.url}/live", timeout=5).status_code == 200


def test_the_gateway_says_which_package_it_needs_for_its_lua_module(tmp_path):
    from serving.gateway import lua_modules

    with pytest.raises(FileNotFoundError, match="libnginx-mod-http-lua"):
        lua_modules(tmp_path)
    (tmp_path / "ndk_http_module.so").touch()
    (tmp_path / "ngx_http_lua_module.so").touch()
    assert [path.name for path in lua_modules(tmp_path)] == ["ndk_http_module.so", "ngx_http_lua_module.so"]
