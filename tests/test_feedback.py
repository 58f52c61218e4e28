"""Delayed ground truth: the feedback store and its outcomes, the live quality it reports, the
feedback route behind the gateway, and the whole loop through the real TorchServe."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from monitoring.quality import brier_score, expected_calibration_error, quality
from project import handler_module
from serving.feedback import MAX_ITEMS, FeedbackStore
from serving.feedback_service import NICENESS, FeedbackProcess, FeedbackServer, Pacer
from serving.server import free_port
from tests.helpers import wait_for

ERRORS = handler_module("emotion_errors").ERRORS
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def answer_line(rid: str, when: float, probabilities, version: str = "1.0") -> str:
    """A request-log line as the handler writes it (the fields the store reads, and others)."""
    row = dict(zip(LABELS, (float(p) for p in probabilities), strict=True))
    entry = {"time": when, "request_id": rid, "model_version": version, "chars": 12, "label": max(row, key=row.get)}
    return json.dumps(entry | {"confidence": max(row.values()), "probabilities": row}) + "\n"


def one_hot(k: int, sure: float = 0.9) -> list[float]:
    return [sure if i == k else (1 - sure) / 5 for i in range(6)]


def make_store(tmp_path, clock: Clock, lines: list[str], **kwargs) -> FeedbackStore:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    with (logs / "requests.jsonl").open("a") as out:
        out.writelines(lines)
    return FeedbackStore(tmp_path / "feedback.sqlite", LABELS, logs, clock=clock, **kwargs)


def test_each_item_gets_its_own_outcome_and_the_first_label_wins(tmp_path):
    clock = Clock()
    store = make_store(tmp_path, clock, [answer_line(f"r{i}", clock.now - 60, one_hot(i % 6)) for i in range(4)])
    outcomes = store.submit(
        [
            {"request_id": "r0", "label": "sadness"},
            {"request_id": "r0", "label": "sadness"},  # the same again: no change
            {"request_id": "r0", "label": "joy"},  # another label: the first is kept
            {"request_id": "nobody", "label": "joy"},
            {"request_id": "r1", "label": "neutral"},
            {"request_id": "r2"},
            {"request_id": "bad id!", "label": "joy"},
            "r3",
        ]
    )
    assert [(o.status, o.result) for o in outcomes] == [
        (200, "accepted"),
        (200, "duplicate"),
        (409, "conflict"),
        (404, "unknown"),
        (400, "invalid"),
        (400, "invalid"),
        (400, "invalid"),
        (400, "invalid"),
    ]
    assert "sadness" in outcomes[2].message
    assert store.window_quality()["1.0"]["labelled"] == 1


def test_an_answer_older_than_the_retention_is_410_and_past_twice_that_forgotten(tmp_path):
    clock = Clock()
    store = make_store(tmp_path, clock, [answer_line("old", clock.now - 3 * DAY, one_hot(0))], retention_days=2)
    assert store.submit([{"request_id": "old", "label": "sadness"}])[0].status == 410
    clock.now += 3 * DAY  # 6 days old: past twice the retention
    store.ingest()
    assert store.submit([{"request_id": "old", "label": "sadness"}])[0].status == 404


def test_the_store_survives_a_restart_and_never_reads_a_line_twice(tmp_path):
    clock = Clock()
    lines = [answer_line(f"r{i}", clock.now - 10, one_hot(i % 6)) for i in range(5)]
    store = make_store(tmp_path, clock, [*lines[:3], lines[3][:20]])  # the 4th line is still being written
    assert store.ingest() == 3
    store.submit([{"request_id": "r0", "label": "sadness"}, {"request_id": "r1", "label": "fear"}])
    store.close()
    with (tmp_path / "logs" / "requests.jsonl").open("a") as out:
        out.write(lines[3][20:] + lines[4])
    (tmp_path / "logs" / "requests.jsonl").rename(tmp_path / "logs" / "requests.jsonl.1")  # rotated
    again = make_store(tmp_path, clock, [answer_line("r5", clock.now, one_hot(2))])
    assert again.ingest() == 3  # r3 (completed), r4, r5: nothing twice
    assert again.ingest() == 0
    assert again.submit([{"request_id": "r0", "label": "joy"}])[0].status == 409  # r0 kept its label
    assert again.window_quality()["1.0"]["labelled"] == 2
    assert oct((tmp_path / "feedback.sqlite").stat().st_mode & 0o777) == "0o600"


def test_an_unknown_id_is_looked_for_in_the_request_log_first(tmp_path):
    clock = Clock()
    store = make_store(tmp_path, clock, [])
    with (tmp_path / "logs" / "requests.jsonl").open("a") as out:
        out.write(answer_line("fresh", clock.now, one_hot(1)))  # served after the last ingest
    assert store.submit([{"request_id": "fresh", "label": "joy"}])[0].status == 200


@given(
    items=st.lists(
        st.tuples(st.sampled_from([f"r{i}" for i in range(8)] + ["x1", "x2"]), st.sampled_from([*LABELS, "meh"])),
        max_size=40,
    )
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_outcomes_follow_the_first_label_rule_whatever_the_sequence(tmp_path_factory, items):
    tmp = tmp_path_factory.mktemp("store")
    clock = Clock()
    store = make_store(tmp, clock, [answer_line(f"r{i}", clock.now, one_hot(i % 6)) for i in range(8)])
    kept: dict[str, str] = {}
    for (rid, label), outcome in zip(
        items, store.submit([{"request_id": r, "label": y} for r, y in items]), strict=True
    ):
        if label not in LABELS:
            expected = 400
        elif rid.startswith("x"):
            expected = 404
        elif rid not in kept:
            expected, kept[rid] = 200, label
        else:
            expected = 200 if kept[rid] == label else 409
        assert outcome.status == expected
    window = store.window_quality().get("1.0", {"labelled": 0})
    assert window["labelled"] == len(kept)
    store.close()


@given(
    rows=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.floats(0.2, 1.0)), min_size=1, max_size=80),
)
@settings(max_examples=60, deadline=None)
def test_quality_agrees_with_scikit_learn(rows):
    truth = [t for t, _, _ in rows]
    probabilities = np.array([one_hot(p, sure) if sure > 1 / 6 else np.full(6, 1 / 6) for _, p, sure in rows])
    predicted = probabilities.argmax(axis=1)
    q = quality(probabilities, truth, LABELS)
    assert q["accuracy"] == pytest.approx(np.mean(predicted == np.array(truth)))
    matrix = confusion_matrix(truth, predicted, labels=range(6))
    assert [[q["confusion"][t][p] for p in LABELS] for t in LABELS] == matrix.tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=range(6), zero_division=np.nan
    )
    for k, name in enumerate(LABELS):
        if support[k]:
            assert q["recall"][name] == pytest.approx(recall[k]) and q["f1"][name] == pytest.approx(f1[k], nan_ok=True)
        else:  # no true label of that class: absent, not 0
            assert name not in q["recall"] and name not in q["f1"]
        if matrix[:, k].sum():
            assert q["precision"][name] == pytest.approx(precision[k])
        else:
            assert name not in q["precision"]
    assert q["ece"] == pytest.approx(expected_calibration_error(probabilities, truth))
    assert q["brier"] == pytest.approx(brier_score(probabilities, truth))


def metric_samples(text: str) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_metrics_cover_the_last_window_per_version_with_absent_classes_absent(tmp_path):
    clock = Clock()
    lines = [answer_line(f"a{i}", clock.now - 100 - i, one_hot(i % 2)) for i in range(30)]  # sadness or joy
    lines += [answer_line(f"b{i}", clock.now - 50, one_hot(3), version="2.0") for i in range(4)]
    store = make_store(tmp_path, clock, lines, window=20)
    for i in range(30):  # oldest labelled first; true labels sadness, every third one wrong
        clock.now += 1
        store.submit([{"request_id": f"a{i}", "label": LABELS[i % 2] if i % 3 else LABELS[1 - i % 2]}])
    store.submit([{"request_id": f"b{i}", "label": "anger"} for i in range(4)])
    samples = metric_samples(store.metrics())
    assert samples[("emotion_quality_labelled", (("version", "1.0"),))] == 20
    last = [i for i in range(10, 30)]
    assert samples[("emotion_quality_accuracy", (("version", "1.0"),))] == pytest.approx(
        np.mean([i % 3 != 0 for i in last])
    )
    assert samples[("emotion_quality_accuracy", (("version", "2.0"),))] == 1.0
    assert ("emotion_quality_recall", (("label", "fear"), ("version", "1.0"))) not in samples  # no label: absent
    assert ("emotion_quality_recall", (("label", "joy"), ("version", "1.0"))) in samples
    confusion = ("emotion_quality_confusion", (("predicted", "joy"), ("true", "sadness"), ("version", "1.0")))
    assert samples[confusion] == sum(1 for i in last if i % 3 == 0 and i % 2 == 1)
    assert samples[("emotion_feedback_label_delay_seconds_count", ())] == 34
    assert samples[("emotion_feedback_items_total", (("result", "accepted"),))] == 34
    assert math.isfinite(samples[("emotion_quality_ece", (("version", "1.0"),))])


@pytest.fixture
def server(tmp_path):
    clock = Clock()
    store = make_store(tmp_path, clock, [answer_line(f"r{i}", clock.now, one_hot(0)) for i in range(3)])
    running = FeedbackServer(store).start()
    yield f"http://127.0.0.1:{running.port}/feedback"
    running.stop()


def test_the_service_answers_an_item_with_its_status_and_a_list_with_each_outcome(server):
    assert requests.post(server, json={"request_id": "r0", "label": "sadness"}, timeout=10).status_code == 200
    single = requests.post(server, json={"request_id": "zz", "label": "joy"}, timeout=10)
    assert single.status_code == 404 and single.json()["result"] == "unknown"
    many = requests.post(
        server, json=[{"request_id": "r1", "label": "joy"}, {"request_id": "r0", "label": "joy"}], timeout=10
    )
    assert many.status_code == 200
    assert [r["status"] for r in many.json()["results"]] == [200, 409] and many.json()["counts"] == {
        "accepted": 1,
        "conflict": 1,
    }
    for body, status in ((b"{not json", 400), (b"[]", 400), (json.dumps([{}] * (MAX_ITEMS + 1)).encode(), 400)):
        answer = requests.post(server, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        assert answer.status_code == status and answer.json()["code"] == status
    assert requests.post(server.replace("/feedback", "/other"), json={}, timeout=10).status_code == 404


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.sampled_from(LABELS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["request_id", "label", "x"]), inner),
    max_leaves=12,
)
BODIES = st.one_of(
    st.binary(max_size=64),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.lists(st.fixed_dictionaries({"request_id": JSON_VALUES, "label": JSON_VALUES}), max_size=5).map(
        lambda v: json.dumps(v).encode()
    ),
    st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.sampled_from([b"NaN", b'{"request_id": "r0", "label": NaN}', b"\xff\xfe{}", b'{"request_id": "r0"}']),
)


@given(body=BODIES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_body_gets_a_json_answer_and_only_valid_items_are_stored(tmp_path_factory, body):
    tmp = tmp_path_factory.mktemp("body")
    clock = Clock()
    store = make_store(tmp, clock, [answer_line("r0", clock.now, one_hot(0))])
    service = FeedbackServer(store)
    try:
        status, answer = service.handle_post(body, "req-1")
        assert status in (200, 400, 404, 409, 410, 413), (status, answer)
        json.dumps(answer, allow_nan=False)  # a JSON answer the gateway can pass on
        if status >= 400 and "result" not in answer:  # the body's error, not one item's outcome
            assert answer["code"] == status == ERRORS[answer["type"]].status and answer["message"]
            assert answer["request_id"] == "req-1"
        stored = store.window_quality().get("1.0", {"labelled": 0})["labelled"]
        results = answer.get("results", [answer])
        assert stored == sum(r.get("result") == "accepted" for r in results)
    finally:
        store.close()


def living_threads(process: psutil.Process) -> dict[int, tuple[int, int]]:
    """``{thread id: (nice, scheduling policy)}`` of the threads of ``process`` alive while read;
    a thread that ends between the listing and the reading is left out, not an error."""
    found = {}
    for thread in process.threads():
        try:
            found[thread.id] = (psutil.Process(thread.id).nice(), os.sched_getscheduler(thread.id))
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return found


@pytest.mark.skipif(sys.platform != "linux", reason="nice and scheduling groups as Linux has them")
def test_the_feedback_service_runs_apart_at_the_lowest_cpu_priority_and_survives_a_restart(tmp_path):
    clock = Clock()
    make_store(tmp_path, clock, [answer_line("r0", time.time(), one_hot(0))]).close()
    labels = tmp_path / "feedback.sqlite", LABELS, tmp_path / "logs"
    service = FeedbackProcess(*labels, free_port(), tmp_path / "feedback.log")
    service.start()
    try:
        process = psutil.Process(service.process.pid)
        assert process.pid != os.getpid() and process.nice() == NICENESS
        threads = living_threads(process)  # a thread may end while it is read: only living ones count
        assert threads and {nice for nice, _ in threads.values()} == {NICENESS}
        if hasattr(os, "SCHED_IDLE"):  # preempted by any other thread that wakes
            assert {policy for _, policy in threads.values()} == {os.SCHED_IDLE}
        group = Path(f"/proc/{process.pid}/autogroup")
        if group.exists():  # where the kernel groups by session, the group is lowered too
            assert group.read_text().split()[-1] == str(NICENESS)
        answer = requests.post(f"{service.url}/feedback", json={"request_id": "r0", "label": "joy"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["result"] == "accepted"
        assert 'emotion_quality_labelled{version="1.0"} 1' in service.fetch()
        assert wait_for(lambda: 'emotion_quality_labelled{version="1.0"} 1' in service.metrics(), 10)
    finally:
        service.stop()
    assert service.fetch() == ""  # a service that does not answer gives no metrics, not an error
    service.start()  # the label is in the store, not in the process
    try:
        again = requests.post(f"{service.url}/feedback", json={"request_id": "r0", "label": "fear"}, timeout=10)
        assert again.status_code == 409 and again.json()["result"] == "conflict"
    finally:
        service.stop()


@given(
    takes=st.lists(st.tuples(st.floats(0, 3), st.integers(1, MAX_ITEMS)), min_size=1, max_size=40),
    rate=st.floats(10, 10_000),
)
@settings(max_examples=200, deadline=None)
def test_the_pacer_never_starts_more_than_its_rate_allows_after_one_seconds_burst(takes, rate):
    clock = Clock(0.0)
    pacer = Pacer(rate, clock)
    started = []  # (start time, items)
    for gap, n in takes:
        clock.now += gap  # the next request arrives
        wait = pacer.take(n)
        assert wait >= 0
        started.append((clock.now + wait, n))
        clock.now += wait  # handled one at a time: the caller sleeps, then works
    for t, _ in started:
        begun = sum(n for s, n in started if s < t)  # items of the requests started before t
        assert begun <= rate * (t + 1.0) + 1e-6
    # and a request after a pause long enough for all of them is never made to wait
    clock.now += sum(n for _, n in takes) / rate
    assert pacer.take(1) == 0.0
