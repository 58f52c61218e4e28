"""The DVC pipeline on a copy of the repository: repro, no-op repro, partial re-runs, push and pull."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FIXTURE_DATA

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A git clone-like copy of the tracked files, with the fixture splits at ../shared/data/emotion."""
    root = tmp_path_factory.mktemp("dvc")
    shared = root / "shared" / "data" / "emotion"
    shared.mkdir(parents=True)
    for name in ("train.txt", "val.txt"):
        shutil.copy(FIXTURE_DATA / name, shared / name)
    repo = root / "repo"
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (PROJECT_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, repo / name)
    (repo / "params.yaml").write_text("experiment: smoke\n")
    (repo / "dvc.lock").unlink(missing_ok=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", WANDB_MODE="disabled")
    env.pop("EMOTION_DATA_DIR", None)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    run(["git", "init", "-q"], repo, env)
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "copy"], repo, env)
    remote = root / "remote"
    run(["dvc", "remote", "add", "--local", "-f", "-d", "testremote", str(remote)], repo, env)
    return repo, env, git, remote


def test_repro_builds_the_archive_then_is_a_no_op(workspace):
    repo, env, _, _ = workspace
    run(["dvc", "repro"], repo, env)
    assert (repo / "model_store" / "emotion.mar").stat().st_size > 1_000_000
    assert (repo / "metrics" / "eval.json").is_file()
    again = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again
    for stage in ("data", "train", "evaluate", "archive"):
        assert f"Stage '{stage}' didn't change, skipping" in again


def test_changing_a_hyperparameter_reruns_only_what_depends_on_it(workspace):
    repo, env, _, _ = workspace
    config = repo / "training" / "conf" / "train" / "default.yaml"
    config.write_text(config.read_text().replace("lr: 1.0e-4", "lr: 2.0e-4"))
    output = run(["dvc", "repro"], repo, env)
    assert "Stage 'data' didn't change, skipping" in output
    assert "Running stage 'train'" in output
    assert "Running stage 'archive'" in output


def test_push_then_pull_into_a_fresh_clone_restores_data_and_model(workspace):
    repo, env, git, remote = workspace
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "pipeline outputs"], repo, env)
    run(["dvc", "push"], repo, env)
    clone = repo.parent / "clone"  # beside the repo, so ../shared resolves the same way
    run(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    run(["dvc", "remote", "add", "--local", "-f", "-d", "testremote", str(remote)], clone, env)
    run(["dvc", "pull"], clone, env)
    for path in ("data/processed/train.txt", "models/emotion/model.safetensors", "model_store/emotion.mar"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)
