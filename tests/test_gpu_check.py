"""``make gpu-check`` (bench/gpu_check.py) without a GPU: its CPU path, arguments, report and the
CUDA compatibility verdict. The GPU run itself is the device check (docs/portability.md, "The GPU check")."""

from __future__ import annotations

import json

import pytest
import torch

from bench.gpu_check import AGREEMENT_TARGET, BATCHES, cuda_verdict, main
from tests.helpers import FIXTURE_DATA


@pytest.mark.parametrize(
    "build, driver, ok",
    [
        ("12.8", "12.8", True),
        ("12.1", "12.2", True),  # a newer driver
        ("12.8", "12.2", True),  # minor-version compatibility within CUDA 12
        ("13.0", "12.2", False),  # a new major version needs a new driver
        ("10.2", "10.1", False),  # before CUDA 11 there was no minor-version compatibility
        (None, "12.2", False),  # a CPU build
        ("12.8", None, False),  # no driver
    ],
)
def test_the_cuda_verdict_follows_cudas_compatibility_rules(build, driver, ok):
    assert cuda_verdict(build, driver)[0] is ok


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the device check runs instead")
def test_without_cuda_it_says_so_and_exits_0(tmp_path, capsys):
    assert main(["check", "--pack", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "--seconds", "0"], "--seconds"),
        (["pack", "--model-dir", "/nonexistent"], "not found"),
        (["pack", "--model-dir", ".", "--limit", "0"], "--limit"),
        (["check", "--device", "tpu"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_check_without_a_pack_says_how_to_make_one(tmp_path):
    with pytest.raises(SystemExit, match="make gpu-pack"):
        main(["check", "--pack", str(tmp_path), "--device", "cpu"])


@pytest.mark.slow
def test_pack_then_the_cpu_path_reports_agreement_speed_and_the_verdict(tiny_model_dir, model_store, tmp_path, capsys):
    pack = tmp_path / "pack"
    argv = ["pack", "--model-dir", str(tiny_model_dir), "--archive", str(model_store / "emotion.mar")]
    assert main([*argv, "--val-file", str(FIXTURE_DATA / "val.txt"), "--out", str(pack)]) == 0
    weights = pack / "model.safetensors"
    assert weights.stat().st_size < 0.6 * (tiny_model_dir / "model.safetensors").stat().st_size  # fp16
    reference = json.loads((pack / "reference.json").read_text())
    assert reference["engine"] == "onnx int8" and len(reference["texts"]) == len(reference["probabilities"])
    out = tmp_path / "report.json"
    code = main(["check", "--pack", str(pack), "--device", "cpu", "--seconds", "0.2", "--out", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert 0 <= row["agreement"] <= 1 and row["max_probability_difference"] >= 0
    assert row["passed"] is (row["agreement"] >= AGREEMENT_TARGET) and code == (0 if row["passed"] else 1)
    assert [s["batch"] for s in row["speed"]] == list(BATCHES)
    assert all(s["texts_per_s"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"] for s in row["speed"])
    printed = capsys.readouterr().out
    assert "| torch fp32 (cpu) |" in printed and f"{'PASS' if row['passed'] else 'FAIL'}: torch fp32" in printed
    assert report["reference"]["cpu"].startswith("CPU ")
