"""The headless Locust run: reports, plot and verdict against a real TorchServe."""

from __future__ import annotations

import json

import pytest
import yaml

from loadtest.run import main as run_loadtest
from loadtest.settings import LoadTestSettings

from .helpers import FIXTURE_DATA


def write_config(path, host: str, **changes) -> str:
    config = {
        "host": host,
        "model": "emotion",
        "texts_file": str(FIXTURE_DATA / "val.txt"),
        "json_share": 0.5,
        "spawn_rate": 4,
        "steps": [{"users": 1, "seconds": 3}, {"users": 2, "seconds": 3}],
        "max_users": 4,
        "p95_budget_ms": 5000,
        "out_dir": str(path.parent / "results"),
    }
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_settings_refuse_remote_hosts_and_oversized_steps(tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        LoadTestSettings.load(write_config(tmp_path / "a.yaml", "http://10.0.0.1:8080"))
    with pytest.raises(ValueError, match="bad step"):
        LoadTestSettings.load(
            write_config(tmp_path / "b.yaml", "http://127.0.0.1:8080", steps=[{"users": 99, "seconds": 1}])
        )


def test_percentile_is_nearest_rank():
    from loadtest.texts import percentile

    values = list(range(100, 0, -1))  # 1..100, unsorted
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 100)) == (50, 95, 100)
    assert percentile([7.0], 99) == 7.0


def test_default_config_is_valid():
    settings = LoadTestSettings.load()
    assert settings.duration > 0 and settings.p95_budget_ms > 0


@pytest.mark.slow
@pytest.mark.integration
def test_loadtest_writes_reports_and_passes_then_fails_on_budget(torchserve, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_INFERENCE_KEY", torchserve.keys["inference"])
    out = tmp_path / "out"
    config = write_config(tmp_path / "ok.yaml", torchserve.inference_url)
    assert run_loadtest(["--config", config, "--out", str(out)]) == 0
    for name in ("report.html", "locust_stats.csv", "locust_stats_history.csv", "loadtest.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loadtest.png").read_bytes()[:4] == b"\x89PNG"

    strict = write_config(
        tmp_path / "strict.yaml", torchserve.inference_url, p95_budget_ms=0.001, steps=[{"users": 1, "seconds": 2}]
    )
    assert run_loadtest(["--config", strict, "--out", str(tmp_path / "strict")]) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_loadtest_fails_when_requests_fail(torchserve, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_INFERENCE_KEY", "wrong-key")
    config = write_config(tmp_path / "c.yaml", torchserve.inference_url, steps=[{"users": 1, "seconds": 2}])
    assert run_loadtest(["--config", config, "--out", str(tmp_path / "out")]) == 1


@pytest.mark.slow
@pytest.mark.integration
def test_batching_sweep_measures_each_setting(model_store, tmp_path):
    from loadtest.batching_sweep import main as sweep

    out = tmp_path / "batching.json"
    config = write_config(tmp_path / "c.yaml", "http://127.0.0.1:8080")
    assert (
        sweep(
            [
                "--config",
                config,
                "--store",
                str(model_store),
                "--batch-sizes",
                "1,4",
                "--delays",
                "5",
                "--workers",
                "1",
                "--concurrency",
                "2",
                "--warmup",
                "1",
                "--duration",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch_size"], r["workers"]) for r in rows] == [(1, 1), (4, 1)]
    assert all(r["requests_per_s"] > 0 and r["failed"] == 0 and r["p95_ms"] >= r["p50_ms"] for r in rows)
