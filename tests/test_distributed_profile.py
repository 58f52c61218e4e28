"""Two-process DDP training with torchrun, and the profiler switch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.server import free_port
from training.config import compose
from training.train import train

from .helpers import tiny_overrides

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_trains_and_only_rank0_writes(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    overrides = tiny_overrides(tmp_path, f"hydra.run.dir={tmp_path / 'hydra'}", "train.max_steps=4")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "training.train", *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["threads_per_process"] == 1
    assert metrics["steps"] == 4
    assert (tmp_path / "model" / "model.safetensors").is_file()
    # rank 1 logs nothing: exactly one "training finished" line
    assert result.stderr.count("training finished") + result.stdout.count("training finished") == 1


def test_profile_switch_writes_trace_and_operator_table(tmp_path):
    cfg = compose(
        tiny_overrides(
            tmp_path,
            "train.profile.enabled=true",
            "train.profile.steps=2",
            f"train.profile.out_dir={tmp_path / 'profile'}",
        )
    )
    train(cfg)
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    table = (tmp_path / "profile" / "top_operators.txt").read_text()
    assert "aten::" in table and "Self CPU" in table
