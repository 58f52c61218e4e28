"""Operator actions under load: scaling workers and rolling a new model version lose no request."""

from __future__ import annotations

import time

import pytest
import requests

from loadtest.closed_loop import ClosedLoop
from serving.archive import build_archive
from serving.client import ManagementError
from serving.gateway import Gateway
from serving.server import free_port
from serving.settings import GatewaySettings
from tests.helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TEXTS = ["i feel so delighted today", "i am terrified of the dark", "i feel lonely tonight", "i am furious at him"]


def describe(server) -> list[dict]:
    return server.client.describe()


def ready_workers(server) -> int:
    return server.client.ready_workers()


def assert_answers(server) -> None:
    answer = requests.post(
        f"{server.inference_url}/predictions/emotion", data=TEXTS[0], headers=server.headers("inference"), timeout=30
    )
    assert answer.status_code == 200, answer.text


def load(server, concurrency: int = 4, base_url: str | None = None) -> ClosedLoop:
    url = f"{base_url or server.inference_url}/predictions/emotion"
    return ClosedLoop(url, server.headers("inference"), TEXTS, concurrency)


def scale(server, workers: int, timeout: float = 120) -> None:
    """Scale asynchronously, then wait until exactly ``workers`` are READY.

    Under load, TorchServe 0.12's reply to a scale call can be a 500 ConcurrentModificationException
    (its worker list changed while the reply was built), whether or not the scaling went through.
    The call sets an absolute worker count, so it is repeated until the describe API shows it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client.scale("emotion", workers)
        except ManagementError as err:
            assert "ConcurrentModificationException" in str(err), f"scale to {workers}: {err}"
        if wait_for(lambda: ready_workers(server) == workers and len(describe(server)[0]["workers"]) == workers, 30):
            return
        assert time.monotonic() < deadline, f"expected {workers} READY workers"


def test_scaling_up_under_load_loses_no_request(torchserve):
    scale(torchserve, 1)
    with load(torchserve) as client:
        for workers in (2, 3):
            scale(torchserve, workers)
            assert client.wait_answered(10), f"no answers after scaling to {workers}"
    result = client.result
    assert len(result.statuses) > 20
    assert result.failed == 0, result.errors[:5]


def test_scaling_down_under_load_through_the_gateway_loses_no_request(torchserve, tmp_path):
    # TorchServe 0.12 answers 500 for the batch a removed worker was running and never answers
    # a batch it was collecting; the gateway retries both on the remaining workers (README,
    # "Operating the service").
    scale(torchserve, 3)
    upstream = torchserve.inference_url.split("//", 1)[1]
    settings = GatewaySettings(port=free_port(), metrics_port=free_port(), attempt_timeout=5)
    gateway = Gateway(upstream, tmp_path / "gateway", settings, upstream_key=torchserve.keys.get("inference"))
    with gateway:
        gateway.set_health(up=True, ready=True)  # no supervisor here: the route is opened by hand
        with load(torchserve, 6, gateway.url) as client:
            assert client.wait_answered(10)
            for workers in (2, 1):
                scale(torchserve, workers)
                assert client.wait_answered(10), f"no answers after scaling to {workers}"
        retried = gateway.retried(answered=len(client.result.statuses))
    result = client.result
    print(f"{len(result.statuses)} requests, {retried} answered on a retry")
    assert len(result.statuses) > 20
    assert result.failed == 0, result.errors[:5]
    assert_answers(torchserve)


def test_rolling_out_version_2_under_load_loses_no_request(torchserve, tiny_model_dir, model_store):
    build_archive(tiny_model_dir, model_store, name="emotion-v2", version="2.0")
    with load(torchserve) as client:
        torchserve.client.register("emotion-v2.mar", model_name="emotion", initial_workers=1, synchronous="true")
        assert {v["modelVersion"] for v in describe(torchserve)} == {"1.0", "2.0"}
        assert client.wait_answered(10)
        torchserve.client.set_default("emotion", "2.0")
        assert client.wait_answered(10)
        torchserve.client.unregister("emotion", "1.0")
        assert client.wait_answered(10)
    versions = describe(torchserve)
    assert [v["modelVersion"] for v in versions] == ["2.0"]
    result = client.result
    assert len(result.statuses) > 20
    assert result.failed == 0, result.errors[:5]
    assert torchserve.client.describe(version=None)[0]["modelVersion"] == "2.0"
    assert_answers(torchserve)
