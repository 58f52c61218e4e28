"""Drift detection end to end: a real Prometheus scrapes a real TorchServe while validation texts
and then a shifted stream are replayed; the drift alerts and ``make drift`` must tell them apart."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from monitoring import drift
from monitoring.drift_rules import dump, render_reference, render_rules
from monitoring.drift_stats import MONITORING_DIR, load_drift_config
from monitoring.profile import load_profile
from monitoring.prometheus_server import Prometheus
from serving.server import TorchServe, free_port
from tests.drift_fixtures import FIXTURES, profiled_store  # noqa: F401 (fixture)
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

WINDOW = "20s"  # the rules' window, short for the test; production: monitoring/drift.yaml
MIN_REQUESTS = 60  # answered requests in the window before a drift alert may fire
STREAM_REQUESTS = 240  # per stream: over make drift's minimum of 200


def validation_texts() -> list[str]:
    return [line.rpartition(";")[0] for line in (FIXTURES / "val.txt").read_text().splitlines() if line]


def replay(texts: list[str], seed: int, count: int) -> list[str]:
    """``count`` texts drawn in shuffled passes over ``texts`` (every text equally often)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        out += rng.sample(texts, len(texts))
    return out[:count]


def shifted(texts: list[str], seed: int, count: int) -> list[str]:
    """A stream unlike ``texts``, built from them: several texts run together (longer inputs,
    mixed emotions) after two emoji (unknown to the tokenizer; in front, where truncation keeps them)."""
    rng = random.Random(seed)
    return ["😱😂 " + " and ".join(rng.sample(texts, 4)) for _ in range(count)]


def send(server: TorchServe, texts: list[str]) -> None:
    """Post ``texts`` with four concurrent clients (so TorchServe batches them); all must succeed."""
    url = f"{server.inference_url}/predictions/emotion"
    headers = {"Content-Type": "text/plain", **server.headers("inference")}
    with requests.Session() as session, ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(lambda t: session.post(url, data=t.encode(), headers=headers, timeout=30).status_code, texts)
        )
    assert statuses == [200] * len(texts)


def drift_alerts(prometheus: Prometheus, state: str | None = None) -> set[str]:
    return {
        a["labels"]["alertname"]
        for a in prometheus.alerts()
        if a["labels"].get("category") == "drift" and (state is None or a["state"] == state)
    }


@pytest.fixture
def services(profiled_store, tmp_path):  # noqa: F811 (fixture)
    """TorchServe serving the profiled archive, and Prometheus scraping it with second-long drift rules."""
    profile = load_profile(profiled_store / "emotion.mar")
    config = load_drift_config()
    config["prometheus"].update(min_requests=MIN_REQUESTS)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "drift_reference.yml").write_text(dump(render_reference(profile), "test"))
    (rules / "drift_rules.yml").write_text(dump(render_rules(config, window=WINDOW, for_="2s"), "test"))
    server = TorchServe(profiled_store, tmp_path / "ts")
    prometheus = None
    try:
        server.start(timeout=180)
        prometheus = Prometheus(
            [server.metrics_url.removeprefix("http://")],
            tmp_path / "prometheus",
            free_port(),
            scrape_interval="1s",
            rule_files=[MONITORING_DIR / "alerts.yml", rules / "drift_reference.yml", rules / "drift_rules.yml"],
        )
        prometheus.start()
        yield server, prometheus, profile
    except Exception:
        print(server.log_tail())
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def test_drift_alerts_and_report_fire_on_a_shifted_stream_only(services, tmp_path):
    server, prometheus, profile = services
    texts = validation_texts()
    log_dir = server.workdir / "logs"  # the TorchServe log folder ($LOG_LOCATION): the request log's default
    assert wait_for(lambda: prometheus.query('up{job="torchserve"} == 1'), 60), "TorchServe was never scraped"

    # 1. validation texts: no drift alert, and make drift's verdict is "no drift"
    started = time.monotonic()
    sent = 0
    while sent < STREAM_REQUESTS or time.monotonic() - started < 25:
        send(server, replay(texts, seed=sent, count=60))
        sent += 60
        assert drift_alerts(prometheus) == set(), "a drift alert on validation texts"
    assert wait_for(lambda: prometheus.query(f"emotion:predictions:{WINDOW} >= {MIN_REQUESTS}"), 15)
    buckets = {r["metric"]["Bucket"] for r in prometheus.query("EmotionConfidence")}
    assert buckets == set(profile["buckets"]["confidence"]["names"])  # every bucket exists, hit or not
    psi = float(prometheus.query(f"emotion:token_length_psi:{WINDOW}")[0]["value"][1])
    assert psi < 0.1
    time.sleep(3)  # longer than the rules' `for`
    assert drift_alerts(prometheus) == set()
    code, summary = drift.run_drift(log_dir, profile, tmp_path / "drift-1", sent, texts)
    assert code == drift.EXIT_OK, summary
    assert summary["requests"] == sent

    # 2. the shifted stream: the length and unknown-token alerts fire within the window, make drift says drift
    shifted_sent = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        send(server, shifted(texts, seed=shifted_sent, count=40))
        shifted_sent += 40
        if shifted_sent >= STREAM_REQUESTS and "EmotionInputLengthShift" in drift_alerts(prometheus, "firing"):
            break
    expected = {"EmotionInputLengthShift", "EmotionUnknownTokensRise"}
    # The two rules are evaluated independently: the second may fire a few evaluations later.
    assert wait_for(lambda: expected <= drift_alerts(prometheus, "firing"), 30), drift_alerts(prometheus)
    code, summary = drift.run_drift(log_dir, profile, tmp_path / "drift-2", shifted_sent, texts)
    assert code == drift.EXIT_DRIFT, summary
    assert "tokens" in summary["drifted_columns"]
    assert (tmp_path / "drift-2" / "report.html").stat().st_size > 10_000


def test_make_drift_compares_logged_texts_with_a_domain_classifier(tmp_path):
    """With texts in the log (the operator's opt-in), the texts themselves are compared too."""
    import json

    from emotion_monitor import EmotionMonitor, RequestLog, RequestRecord

    class NoMetrics:
        def start_distributions(self) -> None: ...

        def distributions(self, *args) -> None: ...

    texts = validation_texts()
    labels = ["sadness", "joy", "love", "anger", "fear", "surprise"]
    profile = {
        "labels": labels,
        "low_confidence": 0.5,
        "records": {"chars": [], "tokens": [], "unknown_share": [], "truncated": [], "label": [], "confidence": []},
    }
    for text in texts:  # a reference built from the same simple statistics the monitor logs
        for key, value in (("chars", len(text)), ("tokens", len(text.split()) + 2), ("unknown_share", 0.0)):
            profile["records"][key].append(value)
        profile["records"]["truncated"].append(False)
        profile["records"]["label"].append(labels[len(text) % 6])
        profile["records"]["confidence"].append(0.9)
    profile["validation"] = {
        "predicted_label_shares": dict.fromkeys(labels, 1 / 6),
        "token_histogram": {},
        "confidence_histogram": {},
        "low_confidence_share": 0.0,
        "unknown_token_share": 0.0,
    }

    def log_stream(folder: Path, stream: list[str]) -> None:
        monitor = EmotionMonitor(NoMetrics(), labels, RequestLog(folder / "requests.jsonl", 10**7, 1), log_texts=True)
        monitor.observe_batch(
            [
                RequestRecord(len(t), len(t.split()) + 2, 0, False, [0.9] + [0.02] * 5, labels[len(t) % 6], t)
                for t in stream
            ]
        )

    log_stream(tmp_path / "same", replay(texts, 0, 240))
    code, summary = drift.run_drift(tmp_path / "same", profile, tmp_path / "out-same", 1000, texts)
    assert summary["texts_compared"] and not summary["columns"]["text"]["drifted"], json.dumps(summary)[:2000]
    assert code == drift.EXIT_OK
    rng = random.Random(0)
    vocabulary = [
        *("invoice", "shipment", "warehouse", "pallet", "courier", "customs", "tariff", "freight", "depot"),
        *("parcel", "ledger", "quarterly", "revenue", "audit", "vendor", "contract", "clause", "delivery"),
        *("route", "manifest", "container", "port", "vessel", "cargo", "tracking"),
    ]
    other = [" ".join(rng.sample(vocabulary, 8)) for _ in range(240)]  # another domain's texts
    log_stream(tmp_path / "other", other)
    code, summary = drift.run_drift(tmp_path / "other", profile, tmp_path / "out-other", 1000, texts)
    assert summary["columns"]["text"]["drifted"]
    assert code == drift.EXIT_DRIFT
