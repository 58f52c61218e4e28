"""Hydra multirun and the Optuna sweeper, each job its own offline W&B run."""

import subprocess
import sys

import pytest

from .helpers import tiny_overrides

pytestmark = pytest.mark.slow


def run_sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m training.train --multirun`` on the tiny config; later overrides win."""
    tiny = tiny_overrides(tmp_path, "train.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    command = [sys.executable, "-m", "training.train", "--multirun", *tiny, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_multirun_grid_gives_each_job_its_own_wandb_run(tmp_path):
    result = run_sweep(
        tmp_path,
        "train.lr=1e-4,2e-4",
        "train.batch_size=8,16",
        "logger=wandb",
        "logger.mode=offline",
        "logger.log_model=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "logs" / "wandb").glob("offline-run-*"))) == 4
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1", "2", "3"]


def test_optuna_search_runs_its_trials(tmp_path):
    result = run_sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Best parameters" in result.stdout + result.stderr
    assert (tmp_path / "sweep" / "optimization_results.yaml").is_file()
