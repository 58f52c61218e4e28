"""A real TorchServe serving the archive: predictions, bad input over HTTP, auth, scaling."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from loadtest.settings import PROJECT_ROOT
from training.data import LABELS

pytestmark = [pytest.mark.slow, pytest.mark.integration]

GOOD = "i feel so delighted today"


def predict(server, data, content_type="text/plain", headers=None):
    url = f"{server.inference_url}/predictions/emotion"
    merged = {"Content-Type": content_type, **server.headers("inference"), **(headers or {})}
    return requests.post(url, data=data, headers=merged, timeout=30)


def assert_good_answer(response):
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in LABELS
    assert list(body["probabilities"]) == list(LABELS)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    return body


def test_plain_text_and_json_predictions(torchserve):
    plain = assert_good_answer(predict(torchserve, GOOD))
    as_json = assert_good_answer(predict(torchserve, json.dumps({"text": GOOD}), "application/json"))
    assert plain["probabilities"] == pytest.approx(as_json["probabilities"], abs=1e-5)


BAD = [
    (b"", "text/plain", 400),
    (b"   \n ", "text/plain", 400),
    (b"\xc3\x28 invalid", "text/plain", 400),
    (b'{"text": ', "application/json", 400),
    (b'{"message": "hi"}', "application/json", 400),
    (b'{"text": 5}', "application/json", 400),
    (b'["a", "b"]', "application/json", 400),
    (b"x" * 5000, "text/plain", 413),
]


def test_each_bad_input_gets_4xx_message_and_server_keeps_serving(torchserve):
    for body, content_type, status in BAD:
        response = predict(torchserve, body, content_type)
        assert response.status_code == status, (body[:30], response.text)
        assert response.json()["message"]
        assert_good_answer(predict(torchserve, GOOD))


def test_bad_requests_in_a_concurrent_burst_do_not_fail_good_ones(torchserve):
    from concurrent.futures import ThreadPoolExecutor

    payloads = [(GOOD, 200), (b"", 400)] * 12
    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(lambda p: predict(torchserve, p[0]).status_code, payloads))
    assert statuses == [expected for _, expected in payloads]


def test_requests_without_keys_are_refused(torchserve):
    assert requests.post(f"{torchserve.inference_url}/predictions/emotion", data=GOOD, timeout=10).status_code in (
        400,
        401,
        403,
    )
    inference_key = torchserve.headers("inference")
    # the inference key does not open the management API
    assert requests.get(f"{torchserve.management_url}/models", headers=inference_key, timeout=10).status_code != 200
    assert (
        requests.get(
            f"{torchserve.management_url}/models", headers=torchserve.headers("management"), timeout=10
        ).status_code
        == 200
    )


def worker_count(server) -> int:
    return len(server.client.describe(version=None)[0]["workers"])


def scale(server, workers: int) -> None:
    server.client.scale("emotion", workers, synchronous=True)


def test_scale_workers_up_and_down(torchserve):
    configured = yaml.safe_load((PROJECT_ROOT / "handler" / "model-config.yaml").read_text())["minWorkers"]
    assert worker_count(torchserve) == configured
    scale(torchserve, configured + 1)
    assert worker_count(torchserve) == configured + 1
    assert_good_answer(predict(torchserve, GOOD))
    scale(torchserve, 1)
    deadline = time.monotonic() + 30
    while worker_count(torchserve) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker_count(torchserve) == 1
    assert_good_answer(predict(torchserve, GOOD))


def test_metrics_endpoint_counts_requests(torchserve):
    assert_good_answer(predict(torchserve, GOOD))
    text = requests.get(f"{torchserve.metrics_url}/metrics", timeout=10).text
    assert "ts_inference_requests_total" in text
    assert 'EmotionPredictions{ModelName="emotion"' in text


def test_unpacked_archives_stay_in_the_work_folder_and_go_when_the_server_stops(model_store, tmp_path):
    """TorchServe unpacks each archive it loads into the JVM's temporary folder and never removes
    it: under the system's /tmp, every start left another copy of the model behind."""
    from tests.helpers import running_torchserve

    system = Path(tempfile.gettempdir()) / "models"
    before = set(system.iterdir()) if system.is_dir() else set()
    # A work folder deep enough that a worker's socket there would pass the 107-byte limit.
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "ts"
    with running_torchserve(model_store, deep) as server:
        folder = server.unpacked
        unpacked = list((folder / "models").iterdir())
        assert len(unpacked) == 1 and (unpacked[0] / "MAR-INF" / "MANIFEST.json").is_file()
        assert_good_answer(predict(server, GOOD))
        new = (set(system.iterdir()) if system.is_dir() else set()) - before
        assert not [p for p in new if p.stat().st_mtime >= unpacked[0].stat().st_mtime - 1]
    assert not folder.exists() and server.unpacked is None


def test_workers_find_none_of_the_packages_torchserve_imports_when_it_can():
    """TorchServe's BaseHandler imports these at every worker start when they are installed; with
    openvino in site-packages a worker started about 4 s later and held 130 MB more (hence
    requirements-openvino.txt, installed apart). Checked in a fresh interpreter of this environment."""
    optional = ("openvino", "intel_extension_for_pytorch", "torch_tensorrt")
    probe = f"import importlib.util as u; print([n for n in {optional!r} if u.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
