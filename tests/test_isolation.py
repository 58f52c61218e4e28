"""Batch isolation: no request's bytes, headers or text can change another request's answer.

Requests are turned into what a TorchServe worker receives by TorchServe's own decoding code
(``ts.protocol.otf_message_handler`` and ``ts.service``), fed a byte frame like the one its front
end sends, and run through the handler as one batch with good requests mixed in.
"""

from __future__ import annotations

import io
import json
import struct

import pytest
from emotion_handler import EmotionHandler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ts.context import Context
from ts.protocol.otf_message_handler import _retrieve_request
from ts.service import Service

from tests.helpers import make_context

pytestmark = pytest.mark.slow

GOOD = [
    ("i feel so delighted today", "text/plain"),
    ("i am terrified of what comes next", "text/plain; charset=utf-8"),
    ('{"text": "honestly i feel lonely right now"}', "application/json"),
    ("i was stunned, really stunned, when the news came", ""),
]


class Frame(io.BytesIO):
    """A socket stand-in for TorchServe's decoding functions: ``recv`` reads from the frame."""

    def recv(self, size: int) -> bytes:
        return self.read(size)


def _field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def frame(request_id: str, body: bytes, content_type: str, headers: dict[str, str]) -> bytes:
    """The bytes TorchServe's front end sends a worker for one request with a raw body."""
    all_headers = {"explain": "False", "url_path": "", **headers}
    if content_type:
        all_headers["Content-Type"] = content_type
    out = _field(request_id.encode())
    for name, value in all_headers.items():
        out += _field(name.encode("utf-8", "surrogatepass")) + _field(value.encode("utf-8", "surrogatepass"))
    out += struct.pack("!i", -1)
    out += _field(b"body") + _field(content_type.split(";")[0].strip().encode()) + _field(body)
    return out + struct.pack("!i", -1)


def run(handler: EmotionHandler, context: Context, requests: list[tuple[bytes, str, dict]]) -> list[tuple[int, dict]]:
    """Decode ``requests`` as a worker does, run them as one batch; (status, body) per request."""
    decoded = [_retrieve_request(Frame(frame(f"r{i}", *r))) for i, r in enumerate(requests)]
    headers, batch, ids = Service.retrieve_data_for_inference(decoded)
    context.request_processor = headers
    context.request_ids = ids
    context.metrics.request_ids = ids
    outputs = handler.handle(batch, context)
    assert len(outputs) == len(requests)
    return [(context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    context = make_context(tiny_model_dir, {"sort_by_length": True, "pass_cost_tokens": 4})
    handler = EmotionHandler()
    handler.initialize(context)
    alone = {good: run(handler, context, [(good[0].encode(), good[1], {})])[0] for good in GOOD}
    return handler, context, alone


hostile_bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(st.characters(categories=["Cc", "Cf", "Z"]), max_size=20).map(str.encode),
    st.integers(1, 3000).map(lambda n: b'{"text": "hi", "x": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(4000, 6000).map(lambda n: b'{"text": "hi", "n": ' + b"7" * n + b"}"),
    st.sampled_from([b'{"text": "\\ud800 hi"}', b'{"text": "\\udfff"}', b'{"text": ["a"]}', b"[1, 2]", b"null"]),
    st.integers(1, 2500).map(lambda n: ("word " * n).encode()),  # long texts: truncation, 413
)
hostile_types = st.sampled_from(
    ["", "text/plain", "application/json", "text/json", "application/x-www-form-urlencoded", "image/png",
     "text/plain; charset=utf-16", "text/plain; charset=nope", "application/octet-stream"]
)  # fmt: skip
hostile_headers = st.dictionaries(
    st.sampled_from(["describe", "explain", "Content-Type", "X-Anything", "Authorization", "url_path"]),
    st.sampled_from(["True", "true", "", "application/json", "\x00"]),
    max_size=3,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    hostile=st.lists(st.tuples(hostile_bodies, hostile_types, hostile_headers), min_size=1, max_size=6),
    good=st.lists(st.sampled_from(GOOD), min_size=1, max_size=4),
    data=st.data(),
)
def test_no_request_can_change_another_requests_answer(served, hostile, good, data):
    handler, context, alone = served
    requests = [("good", g) for g in good] + [("hostile", h) for h in hostile]
    requests = data.draw(st.permutations(requests))
    results = run(handler, context, [(r[0].encode(), r[1], {}) if kind == "good" else r for kind, r in requests])
    for (kind, request), (status, body) in zip(requests, results, strict=True):
        if kind == "good":
            expected_status, expected = alone[request]
            assert status == expected_status == 200
            assert body["label"] == expected["label"]
            assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-4)
        else:
            assert status == 200 or 400 <= status < 500, body
            assert ("label" in body) == (status == 200)


class ExplodingBackend:
    """Wraps a backend and fails any forward pass that contains ``token``: a text the model cannot run."""

    def __init__(self, backend, token: int) -> None:
        self.backend, self.token, self.config = backend, token, backend.config
        self.batch_invariant = backend.batch_invariant

    def __call__(self, input_ids, attention_mask):
        if (input_ids == self.token).any():
            raise RuntimeError("cannot run this text")
        return self.backend(input_ids, attention_mask)


def test_a_text_the_model_fails_on_fails_alone(served, monkeypatch):
    handler, context, alone = served
    token = handler.engine.tokenizer.convert_tokens_to_ids("volcano")
    monkeypatch.setattr(handler.engine, "model", ExplodingBackend(handler.engine.model, token))
    batch = [(g[0].encode(), g[1], {}) for g in GOOD] + [(b"the volcano", "text/plain", {})]
    results = run(handler, context, batch)
    assert results[-1][0] == 422 and results[-1][1]["type"] == "UnprocessableText"
    for good, (status, body) in zip(GOOD, results, strict=False):
        assert status == 200
        assert body["probabilities"] == pytest.approx(alone[good][1]["probabilities"], abs=1e-4)


def test_a_batch_the_model_fails_on_entirely_is_a_server_error(served, monkeypatch):
    from ts.utils.util import PredictionException

    handler, context, _ = served
    monkeypatch.setattr(
        handler.engine, "model", ExplodingBackend(handler.engine.model, handler.engine.tokenizer.cls_token_id)
    )
    with pytest.raises(PredictionException):
        run(handler, context, [(g[0].encode(), g[1], {}) for g in GOOD])
    with pytest.raises(PredictionException):  # a batch of one, the usual at light load, alike
        run(handler, context, [(GOOD[0][0].encode(), GOOD[0][1], {})])


def test_a_batch_of_texts_the_model_fails_on_while_it_still_answers_others_is_the_clients(served, monkeypatch):
    handler, context, _ = served
    token = handler.engine.tokenizer.convert_tokens_to_ids("volcano")
    monkeypatch.setattr(handler.engine, "model", ExplodingBackend(handler.engine.model, token))
    for batch in ([(b"the volcano", "text/plain", {})], [(b"a volcano", "text/plain", {})] * 3):
        results = run(handler, context, batch)
        assert [(status, body["type"]) for status, body in results] == [(422, "UnprocessableText")] * len(batch)


def test_a_text_the_tokenizer_fails_on_fails_alone(served, monkeypatch):
    handler, context, alone = served
    tokenizer = handler.engine.tokenizer

    class Fragile:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, texts, max_length):
            if any("shatter" in t for t in texts):
                raise ValueError("cannot tokenise")
            return tokenizer.encode(texts, max_length)

    monkeypatch.setattr(handler.engine, "tokenizer", Fragile())
    results = run(handler, context, [(b"shatter it", "text/plain", {}), (GOOD[0][0].encode(), GOOD[0][1], {})])
    assert results[0][0] == 400 and results[0][1]["type"] == "UntokenizableText"
    assert results[1][0] == 200
    assert results[1][1]["probabilities"] == pytest.approx(alone[GOOD[0]][1]["probabilities"], abs=1e-4)


def test_long_texts_are_answered_as_truncated(served):
    handler, context, _ = served
    long_text = "i feel " + "very " * (handler.engine.max_length + 10) + "happy"
    results = run(handler, context, [(long_text.encode(), "text/plain", {}), (b"i feel happy", "text/plain", {})])
    assert [r[0] for r in results] == [200, 200]
    assert results[0][1]["truncated"] is True and results[1][1]["truncated"] is False


def test_client_headers_cannot_switch_the_handler_mode(served):
    handler, context, alone = served
    for headers in ({"describe": "True"}, {"explain": "True"}):
        results = run(handler, context, [(GOOD[0][0].encode(), GOOD[0][1], headers)])
        status, body = results[0]
        if headers.get("explain"):  # what the /explanations endpoint sends: refused, alone
            assert (status, body["type"]) == (400, "UnsupportedEndpoint")
        else:
            assert status == 200 and body["label"] == alone[GOOD[0]][1]["label"]
