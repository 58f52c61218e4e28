"""Bulk scoring (``serving.bulk``) and the service's client (``serving.emotion_client``): files of
every kind in, one line per row out, in order, resumed after a kill; retries on 429 and 503 only."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import bulk
from serving.emotion_client import (
    EmotionAPIError,
    EmotionClient,
    Prediction,
    PredictionError,
    read_answer,
    retry_delay,
)
from tests.helpers import FIXTURE_DATA, ScriptedHandler, loopback_http_server, wait_for

TEXTS = [line.rsplit(";", 1)[0] for line in (FIXTURE_DATA / "val.txt").read_text().splitlines()]


def answers(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
def test_each_kind_of_file_gives_its_rows_with_ids(tmp_path, suffix):
    texts = ["i feel fine", 'she said "no", twice', "caf\u00e9 \U0001f600"]
    path = tmp_path / f"in{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
        expected = list(enumerate(texts, 1))
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(["id", "text"])
            writer.writerows([[f"r{i}", t] for i, t in enumerate(texts)])
        expected = [(f"r{i}", t) for i, t in enumerate(texts)]
    else:
        path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n", encoding="utf-8")
        expected = list(enumerate(texts, 1))
    assert list(bulk.read_rows(path)) == expected


def test_rows_that_hold_no_text_are_failed_rows_not_a_stop(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n{"txt": "x"}\n[1]\n{"id": "k", "text": "fine"}\n')
    rows = list(bulk.read_rows(path))
    assert [r[0] for r in rows] == [1, 2, 3, 4, "k"]
    assert [isinstance(r[1], str) for r in rows] == [True, False, False, False, True]
    lines = bulk.score_chunk(lambda texts: [PredictionError(400, "EmptyText", t) for t in texts], rows)
    assert [line["error"]["type"] for line in lines] == [
        "EmptyText",
        "InvalidRow",
        "InvalidRow",
        "InvalidRow",
        "EmptyText",
    ]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=8), st.binary())
def test_a_line_cut_short_is_removed_and_whole_lines_are_kept(tmp_path_factory, texts, tail):
    output = tmp_path_factory.mktemp("resume") / "out.jsonl"
    lines = [json.dumps({"id": i, "label": t}) + "\n" for i, t in enumerate(texts)]
    output.write_bytes("".join(lines).encode() + tail.replace(b"\n", b""))
    done, last, failures, failed = bulk.resume_point(output)
    assert done == len(texts) and last == (len(texts) - 1 if texts else None)
    assert output.read_text(encoding="utf-8") == "".join(lines) and failures == [] and failed == 0


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(status=st.integers(100, 599), body=JSON_VALUES | st.text(max_size=40))
def test_any_answer_is_read_as_its_body_or_as_an_api_error_with_its_status(status, body):
    """The one reader of answers (the client's and the load test's): a 200 with a JSON object
    is its body; anything else is an ``EmotionAPIError`` that keeps the status and, where the
    body says them, the error's type and request id."""
    text = body if isinstance(body, str) else json.dumps(body)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if status == 200 and isinstance(parsed, dict):
        assert read_answer(status, text) == parsed
        return
    with pytest.raises(EmotionAPIError) as refused:
        read_answer(status, text, "rid")
    assert refused.value.status == status
    if isinstance(parsed, dict) and isinstance(parsed.get("type"), str):
        assert refused.value.type == parsed["type"]
    assert refused.value.request_id == ((parsed or {}).get("request_id") if isinstance(parsed, dict) else None) or "rid"


def test_retries_wait_at_least_retry_after_and_back_off():
    assert retry_delay(0, "3", 0.1, 10) >= 3
    assert retry_delay(0, "100", 0.1, 10) <= 10  # capped
    assert 0.05 <= retry_delay(0, None, 0.1, 10) <= 0.1
    assert 0.8 <= retry_delay(4, "garbage", 0.1, 10) <= 1.6


class Flaky(ScriptedHandler):
    """429, then 503, then the answer; or a 400 that must not be retried."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str | None]] = []

    def do_POST(self):
        body = json.loads(self.read_body())
        self.seen.append((self.headers.get("X-Request-ID"), self.headers.get("Authorization")))
        if "bad" in body.get("text", ""):
            return self.answer(400, json.dumps({"code": 400, "type": "EmptyText", "message": "no text"}).encode())
        if len(self.seen) == 1:
            return self.reply(429, {"code": 429, "type": "TooManyRequests", "message": "slow down"}, "0")
        if len(self.seen) == 2:
            return self.reply(503, {"code": 503, "type": "NotReady", "message": "later"}, "0")
        texts = body.get("texts") or [body["text"]]
        one = {"label": "joy", "score": 0.9, "probabilities": {"joy": 0.9}, "truncated": False, "abstained": False}
        answer = {"predictions": [one] * len(texts)} if "texts" in body else one
        self.answer(200, json.dumps(answer | {"request_id": self.headers.get("X-Request-ID")}).encode())

    def reply(self, status, body, retry_after):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Retry-After", retry_after)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_the_client_retries_429_and_503_with_one_request_id_and_never_a_400(monkeypatch):
    Flaky.seen = []
    monkeypatch.setenv("EMOTION_API_KEY", "k" * 32)
    with loopback_http_server(Flaky) as address, EmotionClient(f"http://{address}", backoff=0.01) as client:
        answer = client.predict("i feel fine", request_id="mine-1")
        assert isinstance(answer, Prediction) and answer.label == "joy" and answer.request_id == "mine-1"
        assert Flaky.seen == [("mine-1", f"Bearer {'k' * 32}")] * 3
        with pytest.raises(EmotionAPIError) as refused:
            client.predict("bad")
        assert refused.value.status == 400 and refused.value.type == "EmptyText" and len(Flaky.seen) == 4
        assert [a.label for a in client.predict_many(["a"] * 130)] == ["joy"] * 130  # 3 requests: 64, 64, 2
        assert len(Flaky.seen) == 7


@pytest.fixture(scope="module")
def archive(model_store):
    return model_store / "emotion.mar"


def run_bulk(archive, source, output, **kwargs) -> subprocess.Popen:
    command = [sys.executable, "-m", "serving.bulk", str(source), str(output), "--local", "--archive", str(archive)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_local_scoring_answers_every_row_in_order_and_lists_the_failures(archive, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)] + [{"id": "empty", "text": " "}]
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    process = run_bulk(archive, source, output)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    written = answers(output)
    assert [a["id"] for a in written] == [r["id"] for r in rows] + [len(rows) + 1]
    assert all("label" in a for a in written[: len(TEXTS)])
    assert "2 row(s) failed" in stderr and "id empty:" in stderr and f"id {len(rows) + 1}:" in stderr


@pytest.mark.slow
def test_a_run_killed_midway_resumes_without_a_row_lost_or_written_twice(archive, tmp_path):
    source = tmp_path / "in.txt"
    count = 64 * 12
    source.write_text("\n".join(TEXTS[i % len(TEXTS)] + f" {i}" for i in range(count)) + "\n", encoding="utf-8")
    whole = tmp_path / "whole.jsonl"
    process = run_bulk(archive, source, whole)
    assert process.wait(timeout=600) == 0, process.stderr.read()

    output = tmp_path / "out.jsonl"
    process = run_bulk(archive, source, output, start_new_session=True)
    try:
        assert wait_for(lambda: output.exists() and output.stat().st_size > 0, 300), process.stderr.read()
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    with output.open("ab") as out:  # a crash in the middle of a line
        out.write(b'{"id": 99999, "label": "jo')
    killed_at = len(output.read_bytes().splitlines()) - 1
    print(f"killed after {killed_at} of {count} rows")
    assert 0 < killed_at <= count
    process = run_bulk(archive, source, output)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    assert answers(output) == answers(whole)
    assert [a["id"] for a in answers(output)] == list(range(1, count + 1))


@pytest.mark.slow
def test_an_output_of_another_input_is_not_resumed(archive, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("i feel fine\ni am sad\n")
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": 5, "label": "joy"}\n')
    started = time.monotonic()
    process = run_bulk(archive, source, output)
    assert process.wait(timeout=120) == 2
    assert "does not hold the first rows" in process.stderr.read()
    assert time.monotonic() - started < 120
