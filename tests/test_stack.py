"""Faults under load through the gateway: the real TorchServe behind the real gateway.

A worker killed mid-load, overload, an archive that cannot load, TorchServe restarted behind the
gateway, key rotation, and the lifecycle of ``python -m serving``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from loadtest.closed_loop import ClosedLoop
from project import PROJECT_ROOT
from serving import keys as gateway_keys
from serving.server import free_port
from serving.stack import Stack
from tests.helpers import make_stack, start_ready, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXTS = ["i feel so delighted today", "i am terrified of the dark", "i feel lonely tonight", "i am furious at him"]


@pytest.fixture
def stack(model_store, tmp_path):
    running = make_stack(model_store, tmp_path / "stack")
    try:
        yield start_ready(running)
    finally:
        running.stop()


def predict(stack: Stack, text: str = TEXTS[0], **kwargs) -> requests.Response:
    headers = {"Content-Type": "text/plain", **stack.headers(), **kwargs.pop("headers", {})}
    return requests.post(f"{stack.url}/predictions/emotion", data=text.encode(), headers=headers, timeout=30, **kwargs)


def load(stack: Stack, concurrency: int = 6) -> ClosedLoop:
    return ClosedLoop(f"{stack.url}/predictions/emotion", stack.headers(), TEXTS, concurrency)


def test_a_worker_killed_mid_load_costs_no_request_and_comes_back(stack):
    client = stack.torchserve.client
    workers = len(client.workers())
    with load(stack) as running:
        assert running.wait_answered(10)
        victim = client.workers()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        back = wait_for(
            lambda: client.ready_workers() == workers and victim not in {w["pid"] for w in client.workers()}, 120
        )
        assert running.wait_answered(10)
    result = running.result
    stack.supervise_once()
    print(f"{len(result.statuses)} requests, {stack.access_log.retried} retried; worker back after {back} s")
    assert back is not None, "the killed worker was not replaced"
    assert len(result.statuses) > 20
    assert result.failed == 0, result.errors[:5]


def test_overload_is_refused_fast_without_retries_and_recovers(model_store, tmp_path):
    # A short queue makes TorchServe refuse at a load this machine's client can produce.
    stack = start_ready(make_stack(model_store, tmp_path / "stack", job_queue_size="8"))
    try:
        before = (sum(stack.access_log.responses.values()), stack.access_log.attempts)
        logged_before = len(stack.gateway.log_lines())
        with load(stack, 48) as over:
            time.sleep(10)
        result = over.result
        stack.supervise_once()
        requests_seen = sum(stack.access_log.responses.values()) - before[0]
        attempts = stack.access_log.attempts - before[1]
        # How long the gateway took to refuse, from its access log: 48 client threads on two
        # shared cores add their own scheduling delay to what the client measures.
        stack.gateway.retried(answered=logged_before + len(result.statuses))
        refusals = [
            float(line.split("seconds=", 1)[1].split()[0])
            for line in stack.gateway.log_lines()[logged_before:]
            if '" 503 upstream=' in line or '" 429 upstream=' in line
        ]
        print(f"{len(refusals)} refusals, {attempts / requests_seen:.2f} attempts per request")
        assert set(result.statuses) <= {200, 429, 503}, set(result.statuses)  # 429: the per-client rate
        assert refusals, "no refusal: the load did not overload"
        # Refusals are cheap (no retry: about one attempt per request); how fast they are and the
        # goodput they leave are benchmark figures (`python -m bench.overload`), not a test's.
        assert attempts / requests_seen <= 1.2
        assert predict(stack).status_code == 200  # recovered
    finally:
        stack.stop()


def test_an_archive_that_cannot_load_is_not_ready_and_refuses_at_once(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    handler = tmp_path / "broken_handler.py"
    handler.write_text(
        "from ts.torch_handler.base_handler import BaseHandler\n\n\n"
        "class Broken(BaseHandler):\n"
        "    def initialize(self, context):\n"
        "        raise RuntimeError('this model cannot load')\n"
    )
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [archiver, "--model-name", "broken", "--version", "1.0", "--handler", handler, "--export-path", store],
        check=True,
    )
    stack = make_stack(store, tmp_path / "stack", models="emotion=broken.mar")
    try:
        stack.start()
        time.sleep(3)
        assert requests.get(f"{stack.url}/ready", timeout=5).status_code == 503
        answer = predict(stack)
        # Refused by the gateway (no READY worker), not queued at TorchServe until a timeout.
        assert answer.status_code == 503 and answer.json()["type"] == "NotReady"
        assert answer.headers["Retry-After"]
    finally:
        stack.stop()


def test_torchserve_restarted_behind_the_gateway(stack):
    assert predict(stack).status_code == 200
    stack.torchserve.stop()
    answers = []
    for _ in range(5):
        answer = predict(stack)
        answers.append((answer.status_code, answer.headers.get("Retry-After")))
        time.sleep(0.3)
    assert all(status == 503 and retry_after for status, retry_after in answers), answers
    assert requests.get(f"{stack.url}/ready", timeout=5).status_code == 503
    stack.torchserve.start(timeout=120)  # new TorchServe keys: the gateway follows them
    assert wait_for(lambda: requests.get(f"{stack.url}/ready", timeout=5).status_code == 200, 60) is not None
    assert predict(stack).status_code == 200


def test_gateway_keys_rotate_without_downtime(stack):
    old_headers = stack.headers()
    with ClosedLoop(f"{stack.url}/predictions/emotion", old_headers, TEXTS, 3) as old_clients:
        new_key = gateway_keys.rotate(stack.keys_file, grace_s=10)
        new_headers = {"Authorization": f"Bearer {new_key}"}
        assert wait_for(lambda: predict(stack, headers=new_headers).status_code == 200, 30) is not None
        assert old_clients.wait_answered(10)
    assert old_clients.result.statuses.count(200) > 10
    assert old_clients.result.failed == 0, old_clients.result.errors[:5]  # served through the grace period
    assert wait_for(lambda: predict(stack, headers=old_headers).status_code == 401, 60) is not None
    assert predict(stack, headers=new_headers).status_code == 200
    stack.supervise_once()
    metrics = requests.get(stack.gateway.metrics_url, timeout=5).text
    assert 'emotion_gateway_responses_total{code="401"}' in metrics


def test_the_gateway_follows_torchserves_own_key(stack):
    old = stack.torchserve.keys["inference"]
    new = stack.torchserve.client.rotate_key("inference")  # TorchServe's token API
    assert new != old
    assert wait_for(lambda: stack.gateway.upstream_key == new, 30) is not None
    assert wait_for(lambda: predict(stack).status_code == 200, 30) is not None


def test_stack_cli_start_stop_leaves_no_process_and_drops_readiness_first(model_store, tmp_path):
    workdir, port = tmp_path / "cli", free_port()
    common = ["--workdir", str(workdir), "--model-store", str(model_store), "--port", str(port)]
    common += ["--metrics-port", str(free_port()), "--ts-free-ports", "--drain", "15"]
    run = subprocess.Popen([sys.executable, "-m", "serving", "run", *common], cwd=PROJECT_ROOT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: requests.get(f"{url}/live", timeout=2).ok, 120) is not None
        assert wait_for(lambda: (workdir / "torchserve" / "key_file.json").exists(), 60) is not None
        key = subprocess.run(
            [sys.executable, "-m", "serving", "key", "--workdir", str(workdir)],
            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
        assert wait_for(lambda: requests.post(f"{url}/predictions/emotion", data=b"hi", headers=headers).ok, 120)
        family = [run.pid, *(p.pid for p in psutil.Process(run.pid).children(recursive=True))]
        run.send_signal(signal.SIGTERM)
        assert wait_for(lambda: requests.get(f"{url}/ready", timeout=2).status_code == 503, 10) is not None
        # readiness is down, but requests are still served while load balancers catch up
        assert requests.post(f"{url}/predictions/emotion", data=b"hi", headers=headers, timeout=10).status_code == 200
        run.wait(timeout=60)
        assert wait_for(lambda: not any(psutil.pid_exists(pid) for pid in family), 10) is not None
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)


def test_a_one_minute_soak_loses_nothing_and_holds_its_memory(stack):
    from loadtest.soak import print_report, soak

    report = soak(
        f"{stack.url}/predictions/emotion",
        stack.headers(),
        TEXTS,
        os.getpid(),
        minutes=1,
        window=20,
        capacity_seconds=5,
    )
    print_report(report)
    assert len(report["rows"]) == 3
    assert all(row["requests"] > 0 for row in report["rows"])
    assert {"rss_frontend_mb", "rss_worker0_mb"} <= set(report["rows"][0])
    verdict = {target["target"]: target for target in report["verdict"]}
    assert verdict["no failed request"]["passed"], report["rows"]
    assert next(t for name, t in verdict.items() if name.startswith("RSS growth"))["passed"], report["rows"]
    # Latency over time is judged by the 10-minute `make soak` (README), not by a test.
    assert all(0 < row["p50_ms"] <= row["p95_ms"] for row in report["rows"])


def test_feedback_closes_the_loop_from_an_answer_to_the_live_quality_metrics(stack):
    answers = [predict(stack, text, headers={"X-Request-ID": f"loop-{i}"}) for i, text in enumerate(TEXTS)]
    assert [a.status_code for a in answers] == [200] * len(TEXTS)
    bodies = [a.json() for a in answers]
    assert [b["request_id"] for b in bodies] == [a.headers["X-Request-ID"] for a in answers]
    # True labels: the served one for the first three texts, another for the last.
    truths = [b["label"] for b in bodies[:-1]] + [
        next(k for k in bodies[-1]["probabilities"] if k != bodies[-1]["label"])
    ]
    items = [{"request_id": b["request_id"], "label": y} for b, y in zip(bodies, truths, strict=True)]
    feedback = requests.post(f"{stack.url}/feedback", json=items, headers=stack.headers(), timeout=30)
    assert feedback.status_code == 200, feedback.text
    assert [r["result"] for r in feedback.json()["results"]] == ["accepted"] * len(TEXTS)

    def labelled() -> str:
        text = requests.get(stack.gateway.metrics_url, timeout=10).text
        return text if f'emotion_quality_labelled{{version="1.0"}} {len(TEXTS)}' in text else ""

    metrics = wait_for(labelled, 10)
    assert metrics, "the live quality never reached the gateway's metrics"
    assert 'emotion_quality_accuracy{version="1.0"} 0.75' in metrics
    other = next(k for k in bodies[0]["probabilities"] if k != truths[0])
    again = requests.post(
        f"{stack.url}/feedback", json=items[0] | {"label": other}, headers=stack.headers(), timeout=30
    )
    assert again.status_code == 409 and again.json()["result"] == "conflict"  # the first label is kept
    # Neither the store nor the request log ever holds a key: the client's or TorchServe's.
    secrets = [k.encode() for k in [*stack.client_keys(), *stack.torchserve.keys.values()] if k]
    request_log = stack.torchserve.workdir / "logs" / "requests.jsonl"
    assert stack.feedback_db.stat().st_size and request_log.stat().st_size
    for path in [*stack.feedback_db.parent.glob(f"{stack.feedback_db.name}*"), request_log]:
        assert not any(secret in path.read_bytes() for secret in secrets), path


def test_make_quality_agrees_with_the_offline_evaluation_and_says_when_it_cannot(
    stack, model_store, tmp_path, capsys, monkeypatch
):
    from monitoring import live_quality

    labels = ["sadness", "joy", "love", "anger", "fear", "surprise"]
    rows = [f"{text} number {i};{labels[(i * 7) % 6]}" for i, text in enumerate(TEXTS * 8)]
    labelled = tmp_path / "labelled.txt"
    labelled.write_text("\n".join(rows) + "\n")
    monkeypatch.setenv("EMOTION_INFERENCE_KEY", stack.headers()["Authorization"].split()[-1])
    argv = ["--file", str(labelled), "--url", stack.url, "--metrics-url", stack.gateway.metrics_url]
    argv += ["--archive", str(model_store / "emotion.mar"), "--concurrency", "2"]
    assert live_quality.main(argv) == live_quality.EXIT_AGREE
    out = capsys.readouterr().out
    assert f"{'labelled in window':22} {len(rows):>16}" in out and "agree" in out
    # A second replay shares the window with the first one's labels: nothing to compare.
    assert live_quality.main([*argv, "--limit", "8"]) == live_quality.EXIT_DISAGREE
    assert "cannot compare" in capsys.readouterr().err
    # Nothing listening: the exit code that says so.
    unused = ["--metrics-url", f"http://127.0.0.1:{free_port()}/metrics", "--file", str(labelled)]
    assert live_quality.main(unused) == live_quality.EXIT_NO_SERVICE


def test_a_feedback_service_that_dies_is_started_again_and_keeps_its_labels(stack):
    answer = predict(stack, headers={"X-Request-ID": "revive-1"})
    assert answer.status_code == 200
    url, item = f"{stack.url}/feedback", {"request_id": "revive-1", "label": answer.json()["label"]}
    assert requests.post(url, json=item, headers=stack.headers(), timeout=30).status_code == 200
    victim = stack.feedback.process.pid
    os.kill(victim, signal.SIGKILL)
    revived = wait_for(lambda: stack.feedback.process.running() and stack.feedback.process.pid != victim, 30)
    assert revived, "the supervisor did not start the feedback service again"

    def answered() -> requests.Response | None:
        again = requests.post(url, json=item, headers=stack.headers(), timeout=30)
        return again if again.status_code != 503 else None  # 503 until the new process listens

    again = wait_for(answered, 60)
    assert again is not None and again.json()["result"] == "duplicate"  # the label outlived its process
