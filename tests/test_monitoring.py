"""Alert rules under promtool, and a real Prometheus scraping a real TorchServe."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from monitoring.prometheus_server import Prometheus
from serving.server import free_port
from training.data import LABELS

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (make system-deps)"
)


@needs_promtool
def test_alert_rules_pass_their_unit_tests():
    result = subprocess.run(
        ["promtool", "test", "rules", "tests/alerts_test.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_prometheus_config_is_valid():
    result = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_prometheus_scrapes_torchserve_and_handler_metrics(torchserve, tmp_path):
    texts = ["i feel so delighted today", "i am terrified of the dark", "i feel lonely", "so glad", "furious"]
    labels = []
    for text in texts:
        response = requests.post(
            f"{torchserve.inference_url}/predictions/emotion",
            data=text,
            headers={"Content-Type": "text/plain", **torchserve.headers("inference")},
            timeout=30,
        )
        assert response.status_code == 200
        labels.append(response.json()["label"])
    bad = requests.post(
        f"{torchserve.inference_url}/predictions/emotion",
        data="  ",
        headers={"Content-Type": "text/plain", **torchserve.headers("inference")},
        timeout=30,
    )
    assert bad.status_code == 400

    target = torchserve.metrics_url.removeprefix("http://")
    prometheus = Prometheus([target], tmp_path / "prometheus", free_port(), scrape_interval="1s")
    try:
        prometheus.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not prometheus.query('up{job="torchserve"} == 1'):
            time.sleep(0.5)
        assert prometheus.query('up{job="torchserve"} == 1'), "TorchServe was never scraped"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not prometheus.query("EmotionPredictions"):
            time.sleep(0.5)

        total = prometheus.query('sum(ts_inference_requests_total{model_name="emotion"})')
        assert float(total[0]["value"][1]) == len(texts) + 1  # the 400 was an inference request too
        per_label = {r["metric"]["Label"]: float(r["value"][1]) for r in prometheus.query("EmotionPredictions")}
        # every label has its series from the start, at 0 until the model first gives it
        assert per_label == {label: float(labels.count(label)) for label in LABELS}
        rejected = prometheus.query('EmotionRejected{Reason="EmptyText"}')
        assert float(rejected[0]["value"][1]) == 1
        tokens = float(prometheus.query("sum(EmotionInputTokens)")[0]["value"][1])
        assert tokens >= sum(len(t.split()) for t in texts)
        assert float(prometheus.query("sum(EmotionModelMs)")[0]["value"][1]) > 0
        rules = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"EmotionTargetDown", "EmotionHighMeanLatency"}
        # every Grafana panel query is valid PromQL against the live server
        dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
        for target in (t for panel in dashboard["panels"] for t in panel["targets"]):
            prometheus.query(target["expr"])
    finally:
        prometheus.stop()
