"""The benchmark's peers (LitServe, Ray Serve), its in-process ceiling and the engine comparison:
each serves the archive's own engine and answers exactly as that engine does in-process."""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import requests
import torch
import yaml

from bench import peers
from bench.run import answers
from project import PROJECT_ROOT
from serving.process import ManagedProcess
from serving.server import free_port
from tests.helpers import FIXTURE_DATA

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TEXTS = ["i feel wonderful today", "i am scared of what will happen", "i feel " + "very " * 80 + "angry"]


@pytest.fixture(scope="module")
def engine_dir(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's archive, unpacked as the benchmark unpacks d's."""
    target = tmp_path_factory.mktemp("engine")
    with zipfile.ZipFile(model_store / "emotion.mar") as archive:
        archive.extractall(target)
    return target


@pytest.fixture(scope="module")
def expected(engine_dir: Path) -> list[dict]:
    """The engine's answers in this process, one text per pass (as a peer serves single requests)."""
    engine = peers.load_engine(engine_dir)
    return [engine.predict([text])[0] for text in TEXTS]


def test_serving_shape_copies_the_archive_batching(engine_dir):
    config = yaml.safe_load((engine_dir / "model-config.yaml").read_text())
    shape = peers.ServingShape.of(engine_dir)
    assert shape.workers == config["minWorkers"]
    assert shape.batch_size == config["batchSize"]
    assert shape.batch_delay_s == pytest.approx(config["maxBatchDelay"] / 1000)
    assert peers.worker_threads(engine_dir) == (config["handler"].get("threads") or torch.get_num_threads())


def test_a_folder_without_model_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="unpacked archive"):
        peers.ServingShape.of(tmp_path)


@pytest.mark.parametrize("body, content_type", [(b'{"text": "hi"}', "application/json"), (b"hi", "text/plain")])
def test_text_of_reads_json_and_plain_bodies(body, content_type):
    assert peers.text_of(body, content_type) == "hi"


@pytest.mark.parametrize("server", ["litserve", "ray"])
def test_peer_answers_as_the_engine_does(server, engine_dir, expected, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "bench.peers", server, "--engine-dir", str(engine_dir), "--port", str(port)]
    url = f"http://127.0.0.1:{port}{peers.ROUTE}"
    # Ray's socket paths must stay under 108 bytes: a short session folder, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as session:
        if server == "ray":
            command += ["--temp-dir", session]
        with ManagedProcess(server, command, tmp_path / "peer.log", cwd=PROJECT_ROOT) as process:
            process.start()
            process.wait_until(lambda: answers(url, {"text": "hello"}), timeout=600, what="answering")
            for text, want in zip(TEXTS, expected, strict=True):
                got = requests.post(url, json={"text": text}, timeout=30).json()
                assert got["label"] == want["label"]
                assert got["truncated"] == want["truncated"]
                assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert not process.running()


def test_ceiling_runs_the_archive_worker_count(engine_dir):
    texts = [line.rsplit(";", 1)[0] for line in (FIXTURE_DATA / "val.txt").read_text().splitlines()]
    result = peers.ceiling(engine_dir, texts, seconds=1.0)
    shape = peers.ServingShape.of(engine_dir)
    assert (result["workers"], result["batch_size"]) == (shape.workers, shape.batch_size)
    assert result["requests_per_s"] > 0


def test_engine_comparison_measures_speed_accuracy_and_the_matrix_rate(tiny_model_dir, tmp_path, capsys):
    from bench.engines import main

    out = tmp_path / "engines.json"
    only = ["onnxruntime fp32", "onnxruntime int8 dynamic", "openvino int8 static"]
    argv = ["--model-dir", str(tiny_model_dir), "--val-file", str(FIXTURE_DATA / "val.txt")]
    argv += ["--calibration-file", str(FIXTURE_DATA / "train.txt"), "--duration", "1", "--out", str(out), "--only"]
    assert main([*argv, *only]) == 0
    report = json.loads(out.read_text())
    assert [row["engine"] for row in report["rows"]] == only
    peaks = report["cpu"]["peak_gflops"]
    for row in report["rows"]:
        assert "failed" not in row, row
        assert row["texts_per_s"] > 0 and 0 <= row["val_accuracy"] <= 1
        # Shares of the peaks this run computed; their size is the CPU's (a benchmark figure).
        assert row["fp32_peak_share"] == pytest.approx(row["gflops"] / peaks["fp32"], abs=1e-3)
        assert row["int8_peak_share"] == pytest.approx(row["gflops"] / peaks["int8"], abs=1e-3)
    assert report["rows"][0]["speedup"] == 1.0
    assert report["fastest_within_max_drop"] in only
    printed = capsys.readouterr().out
    assert printed.startswith("CPU ") and "| onnxruntime int8 dynamic |" in printed
    assert report["int8_verdict"]["engine"] == report["cpu"]["int8_engine"]
    assert f"{'PASS' if report['int8_verdict']['passed'] else 'FAIL'}: " in printed


def test_the_int8_verdict_judges_the_cpus_int8_engine_against_the_target():
    from bench.engines import INT8_EFFICIENCY_TARGET, int8_verdict

    rows = [
        {"engine": "onnxruntime fp32", "int8_peak_share": 0.9},
        {"engine": "slow int8", "int8_peak_share": INT8_EFFICIENCY_TARGET - 0.01},
        {"engine": "fast int8", "int8_peak_share": INT8_EFFICIENCY_TARGET},
    ]
    assert int8_verdict(rows, "slow int8")["passed"] is False
    assert int8_verdict(rows, "fast int8")["passed"] is True
    assert int8_verdict(rows, "onnxruntime fp32") is None  # no int8 engine on this CPU: nothing to judge
    assert int8_verdict(rows, "not measured int8") is None


def test_matmul_flops_grow_with_batch_and_tokens():
    from bench.engines import matmul_flops

    config = type("C", (), {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2})()
    one = matmul_flops(config, 1, 10)
    assert matmul_flops(config, 2, 10) == 2 * one
    assert matmul_flops(config, 1, 20) > 2 * one  # attention grows with the square of the length
