"""Hostile clients against the live gateway and TorchServe, by class of attack.

One stack (TorchServe behind the gateway, real keys) serves every case. In every case: no 5xx but
an overload 503 with ``Retry-After``; no prediction without a valid key; an error is JSON that
names its ``type``; nothing is held open past its deadline; and the next good request is still
answered 200. Requests go out as raw bytes where a client library would tidy them up.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROUTE = "/predictions/emotion"
CASES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# nginx's client_header_timeout and client_body_timeout are 10 s: a stalled request is answered or
# closed by then; this bound leaves room for a loaded machine.
DEADLINE_S = 30


@pytest.fixture(scope="module")
def key(stack) -> str:
    return stack.client_keys()[0]


def raw(port: int, data: bytes, timeout: float = DEADLINE_S) -> tuple[int, dict[str, str], bytes, float]:
    """Send ``data`` as is and read until the server closes; (status, headers, body, seconds)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body, time.monotonic() - began


def request(method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as bytes (``Connection: close``; Content-Length unless a header sets it)."""
    all_headers = {"Host": "localhost", "Connection": "close", **(headers or {})}
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in all_headers):
        all_headers["Content-Length"] = str(len(body))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in all_headers.items())
    return head.encode("latin-1") + b"\r\n" + body


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}


def assert_safe(answer, authorized: bool = True, method: str = "POST") -> dict | None:
    """The invariants of every hostile case; returns the JSON body (None for HEAD)."""
    status, headers, body, seconds = answer
    assert status, "no HTTP answer"
    assert seconds < DEADLINE_S
    assert status < 500 or (status == 503 and "retry-after" in headers), (status, body[:300])
    assert headers.get("x-content-type-options") == "nosniff", headers
    assert not re.search(r"nginx/\d|TorchServe", headers.get("server", "")), headers  # no version given away
    if not authorized:
        assert status != 200, body[:300]
    if method == "HEAD":
        return None
    answer_json = json.loads(body)
    if status >= 400:
        assert isinstance(answer_json.get("type"), str) and answer_json.get("code") == status, answer_json
    elif status == 200 and method == "POST":
        # A prediction, or a list's: each entry a prediction or that text's own error.
        for one in answer_json.get("predictions", [answer_json]):
            assert set(one) >= {"label", "probabilities"} or one["code"] >= 400, answer_json
    return answer_json


def assert_still_serving(stack, key: str) -> None:
    status, _, body, _ = raw(stack.gateway.settings.port, request("POST", ROUTE, auth(key), b"i feel fine today"))
    assert status == 200 and "label" in json.loads(body)


SEGMENTS = st.sampled_from(
    ["predictions", "emotion", "..", ".", "", "%2e", "%2e%2e", "%2F", "emotion;x", "ping", "models", "metrics",
     "explanations", "1.0", "EMOTION", "emotion%00", "api-description", "%", "~"]
)  # fmt: skip


@CASES
@given(st.lists(SEGMENTS, min_size=1, max_size=5), st.sampled_from(["", "?a=1", "#f", "?"]))
def test_paths_other_than_the_route_never_reach_torchserve(stack, key, segments, suffix):
    target = "/" + "/".join(segments) + suffix
    body = assert_safe(raw(stack.gateway.settings.port, request("POST", target, auth(key), b"i feel fine")))
    # The prediction route, and the explanations' (its own service, not TorchServe), as written.
    exact = target in (ROUTE, ROUTE + "/1.0", "/explanations/emotion")
    if not exact:
        assert "label" not in (body or {}), (target, body)
    assert_still_serving(stack, key)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Api-Key": "{key}"},
        {"Cookie": "key={key}"},
        {"Authorization": "Basic {key}"},
        {"Authorization": "Bearer {key}x"},
        {"Authorization": "Bearer x{key}"},
        {"Authorization": "Bearer"},
        {"Authorization": "{key}"},
        {"Proxy-Authorization": "Bearer {key}"},
        {"Authorization": "Bearer {key}, Bearer other"},
    ],
)
def test_a_key_anywhere_but_authorization_bearer_is_no_key(stack, key, headers):
    headers = {name: value.format(key=key) for name, value in headers.items()}
    for target in (ROUTE, f"{ROUTE}?key={key}", f"{ROUTE}?access_token={key}"):
        answer = raw(
            stack.gateway.settings.port, request("POST", target, {"Content-Type": "text/plain", **headers}, b"hi")
        )
        assert assert_safe(answer, authorized=False)["type"] in ("Unauthorized", "InvalidPath")
    assert_still_serving(stack, key)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "HEAD", "post", "PROPFIND"])
def test_other_methods_are_refused_on_the_route(stack, key, method):
    answer = raw(stack.gateway.settings.port, request(method, ROUTE, auth(key), b"hi"))
    assert_safe(answer, authorized=False, method=method)
    assert answer[0] in (400, 405, 501), answer[:2]
    assert_still_serving(stack, key)


@pytest.mark.parametrize(
    "line",
    [
        f"POST http://localhost{ROUTE} HTTP/1.1",  # absolute form
        f"POST {ROUTE} HTTP/2.0",
        f"POST {ROUTE} HTTP/1.9",
        f"POST  {ROUTE} HTTP/1.1",
        f"POST {ROUTE}",
        f"POST {ROUTE} XTTP/1.1",
        "POST * HTTP/1.1",
        f"POST {'/a' * 5000} HTTP/1.1",
    ],
)
def test_odd_request_lines_get_json_refusals(stack, key, line):
    head = f"{line}\r\nHost: localhost\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
    if "http://" in line:  # nginx takes the absolute form; the key still decides
        assert_safe(raw(stack.gateway.settings.port, head.encode()), authorized=False)
    else:
        status, headers, body, seconds = raw(stack.gateway.settings.port, head.encode())
        assert seconds < DEADLINE_S
        if status or line.count(" ") > 1:  # no version at all: HTTP/0.9, whose answers have no status line
            assert_safe((status, headers, body, seconds), authorized=False)
            assert 400 <= status < 500, (status, body)
    assert_still_serving(stack, key)


@pytest.mark.parametrize(
    "framing",
    [
        {"Transfer-Encoding": "chunked", "Content-Length": "11"},
        {"Transfer-Encoding": "gzip, chunked"},
        {"Transfer-Encoding": "identity"},
        {"Content-Length": "2, 3"},
        {"Content-Length": "-1"},
        {"Content-Length": "99999999999999999999"},
        {"Content-Length": "abc"},
        {"Content-Length": str(2 * 1024 * 1024)},
    ],
)
def test_framing_conflicts_and_absurd_lengths_are_refused(stack, key, framing):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain", **framing}
    body = b"5\r\nhello\r\n0\r\n\r\n" if "chunked" in framing.get("Transfer-Encoding", "") else b"hello"
    answer = raw(stack.gateway.settings.port, request("POST", ROUTE, headers, body))
    assert_safe(answer)
    assert answer[0] in (400, 411, 413), answer[:2]
    assert_still_serving(stack, key)


def test_a_chunked_body_is_refused_unread_with_411(stack, key):
    """A body must say its length: only then can it be held to the request deadline."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain", "Transfer-Encoding": "chunked"}
    answer = raw(stack.gateway.settings.port, request("POST", ROUTE, headers, b"b\r\ni feel glad\r\n0\r\n\r\n"))
    assert answer[0] == 411 and assert_safe(answer)["type"] == "LengthRequired"
    assert_still_serving(stack, key)


@pytest.mark.parametrize("route", [ROUTE, "/feedback", "/live", "/nowhere"])
def test_a_body_dripped_past_the_request_deadline_is_cut(stack, key, route):
    """Each byte within the per-read timeout, the whole past the deadline (20 s): cut by then."""
    headers = {**auth(key), "Content-Type": "text/plain", "Content-Length": "2000"}
    port = stack.gateway.settings.port
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(request("POST", route, headers, b""))
        sock.setblocking(False)
        try:
            while time.monotonic() - started < DEADLINE_S:
                sock.send(b"x")
                time.sleep(0.5)
                try:
                    sock.recv(65536)  # an answer, or b"" (closed): the gateway is done with it
                    break
                except BlockingIOError:
                    continue
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed
    assert time.monotonic() - started < stack.gateway.settings.request_deadline + 3
    assert_still_serving(stack, key)


@pytest.mark.parametrize("stall", ["headers", "body"])
def test_a_stalled_request_is_answered_or_closed_by_its_deadline(stack, key, stall):
    data = request("POST", ROUTE, {**auth(key), "Content-Length": "100"}, b"")
    partial = data[: len(data) // 2] if stall == "headers" else data + b"only part of it"
    status, _, body, seconds = raw(stack.gateway.settings.port, partial)
    assert seconds < DEADLINE_S
    if status:
        assert status == 408 and json.loads(body)["type"] == "RequestTimeout", (status, body)
    assert_still_serving(stack, key)


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "identity, gzip", "x-anything", "GZIP"])
def test_compressed_bodies_are_refused_unread(stack, key, encoding):
    import gzip

    bomb = gzip.compress(b"a" * 10_000_000)  # 10 MB of text in about 10 kB
    answer = raw(stack.gateway.settings.port, request("POST", ROUTE, {**auth(key), "Content-Encoding": encoding}, bomb))
    assert assert_safe(answer)["type"] == "UnsupportedContentEncoding"
    assert_still_serving(stack, key)


JSON_EDGES = [
    b'{"text": "i am happy", "text": "i am sad"}',
    b'{"text": NaN}',
    b'{"text": "hi", "x": Infinity}',
    b'{"text": "hi", "n": ' + b"9" * 4000 + b"}",
    b'{"text": "hi", "n": 1e999999}',
    b'{"text": "hi", "d": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"text": "hi", ' + b", ".join(f'"k{i}": {i}'.encode() for i in range(20000)) + b"}",
    b'[{"text": "one"}, {"text": "two"}]',
    b'{"text": ["one", "two"]}',
    b'{"texts": ["one", "two"]}',
    b'{"text": "\\ud800"}',
    b'{"text": "\\u0000"}',
    b"",
    b"{",
    b'"just a string"',
]


@pytest.mark.parametrize("body", JSON_EDGES, ids=range(len(JSON_EDGES)))
def test_json_edges_are_answered_or_refused_by_name(stack, key, body):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    assert_safe(raw(stack.gateway.settings.port, request("POST", ROUTE, headers, body)))
    assert_still_serving(stack, key)


@CASES
@given(st.binary(min_size=1, max_size=300), st.sampled_from(["text/plain", "text/plain; charset=latin-1",
                                                             "text/plain; charset=utf-16", "application/json",
                                                             "application/octet-stream", "image/png", ""]))  # fmt: skip
def test_any_bytes_in_any_declared_charset_get_a_json_answer(stack, key, body, content_type):
    headers = {"Authorization": f"Bearer {key}"} | ({"Content-Type": content_type} if content_type else {})
    assert_safe(raw(stack.gateway.settings.port, request("POST", ROUTE, headers, body)))


@pytest.mark.parametrize("body", [b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", "é".encode("latin-1")])
def test_overlong_and_surrogate_utf8_is_invalid_encoding(stack, key, body):
    answer = raw(stack.gateway.settings.port, request("POST", ROUTE, auth(key), body))
    assert assert_safe(answer)["type"] == "InvalidEncoding"


@pytest.mark.parametrize("size", [2001, 100_000, 1024 * 1024 - 400])
def test_oversized_texts_are_refused_for_their_length(stack, key, size):
    answer = raw(stack.gateway.settings.port, request("POST", ROUTE, auth(key), b"a" * size))
    assert assert_safe(answer)["type"] in ("TextTooLong", "BodyTooLarge")
    assert_still_serving(stack, key)


def test_only_the_gateway_listens_and_only_on_loopback(stack):
    """Every port TorchServe and nginx listen on is bound to 127.0.0.1: a client on another host
    reaches none of them, and the gateway is the one port meant for clients."""
    family = [stack.torchserve.process.pid, stack.gateway.process.pid]
    processes = []
    for pid in family:
        parent = psutil.Process(pid)
        processes += [parent, *parent.children(recursive=True)]
    listening = [c.laddr for p in processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    addresses = [ipaddress.ip_address(a.ip) for a in listening]
    unmapped = [getattr(address, "ipv4_mapped", None) or address for address in addresses]  # ::ffff:127.0.0.1
    assert listening and all(address.is_loopback for address in unmapped), listening
    assert stack.gateway.settings.port in {address.port for address in listening}
