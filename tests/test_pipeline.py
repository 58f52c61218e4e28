"""The DVC pipeline: its outputs named as the Hydra paths name them, and on a copy of the repository:
repro, no-op repro, partial re-runs, push and pull."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from project import PROJECT_ROOT, read_params
from training.config import experiment_paths
from training.distill import TeacherLogits

from .helpers import copy_workspace


def stage_paths(experiment: str, teacher: str = "none") -> dict[str, set[str]]:
    """Each stage's declared outputs and dependencies in dvc.yaml, for ``experiment`` and ``teacher``."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    paths = {}
    for name, stage in stages.items():
        entries = [*stage.get("deps", []), *stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
        names = [next(iter(e)) if isinstance(e, dict) else e for e in entries]
        paths[name] = {n.replace("${experiment}", experiment).replace("${teacher}", teacher) for n in names}
    return paths


@pytest.mark.parametrize("experiment", ["default", "full", "quick"])
def test_stage_outputs_are_where_training_writes_them(experiment):
    expected = experiment_paths(experiment)
    model_dir = expected.model_dir.relative_to(PROJECT_ROOT).as_posix()
    metrics_dir = expected.metrics_dir.relative_to(PROJECT_ROOT).as_posix()
    paths = stage_paths(experiment)
    assert model_dir in paths["train"] and model_dir in paths["evaluate"] and model_dir in paths["archive"]
    assert f"{metrics_dir}/train.json" in paths["train"]
    assert f"{metrics_dir}/eval.json" in paths["evaluate"]
    # The temperature: fitted beside the model folder, read by the profile and packed by the archive.
    calibration = f"{model_dir}.calibration.json"
    assert calibration in paths["calibrate"] and calibration in paths["profile"] and calibration in paths["archive"]
    assert f"{metrics_dir}/calibration.json" in paths["calibrate"]
    # The training split's words: counted beside the model folder, read by evaluate, packed by the archive.
    words = f"{model_dir}.words.json"
    assert words in paths["words"] and words in paths["evaluate"] and words in paths["archive"]
    assert "data/processed/train.txt" in paths["words"] and "data/processed/val.txt" not in paths["words"]
    archive_cmd = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]["archive"]["cmd"]
    assert f"--model-dir {model_dir} " in archive_cmd.replace("${experiment}", experiment)


def test_stages_depend_on_every_code_folder_they_run():
    paths = stage_paths("default")
    for stage in ("train", "calibrate", "evaluate"):
        assert {"training", "project.py"} <= paths[stage], stage
    assert {"project.py", "training/prepare.py", "training/data.py", "training/config.py"} <= paths["data"]
    assert {"handler", "serving/archive.py", "project.py"} <= paths["archive"]


def test_lock_file_describes_the_experiment_params_yaml_names():
    experiment, teacher = read_params()["experiment"], read_params()["teacher"]
    lock = yaml.safe_load((PROJECT_ROOT / "dvc.lock").read_text())["stages"]
    assert lock["train"]["cmd"] == f"python -m training.train experiment={experiment} distill.teacher={teacher}"
    assert lock["train"]["params"]["params.yaml"] == {"experiment": experiment, "teacher": teacher}
    assert lock["teacher_logits"]["cmd"] == f"python -m training.teacher logits {teacher}"
    model_dir = experiment_paths(experiment).model_dir.relative_to(PROJECT_ROOT).as_posix()
    assert [out["path"] for out in lock["train"]["outs"] if out["path"].startswith("models/")] == [model_dir]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A clone-like copy (``copy_workspace``) building the smoke experiment, without a lock file."""
    root = tmp_path_factory.mktemp("dvc")
    repo, env = copy_workspace(root)
    (repo / "params.yaml").write_text("experiment: smoke\nteacher: none\n")
    (repo / "dvc.lock").unlink(missing_ok=True)
    env["WANDB_MODE"] = "disabled"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    remote = root / "remote"
    run(["dvc", "remote", "add", "--local", "-f", "-d", "testremote", str(remote)], repo, env)
    return repo, env, git, remote


@pytest.mark.slow
@pytest.mark.integration
def test_repro_builds_the_archive_then_is_a_no_op(workspace):
    repo, env, _, _ = workspace
    run(["dvc", "repro"], repo, env)
    assert (repo / "model_store" / "emotion.mar").stat().st_size > 1_000_000
    assert (repo / "metrics" / "smoke" / "eval.json").is_file()
    with zipfile.ZipFile(repo / "model_store" / "emotion.mar") as archive:  # the fitted temperature, packed
        packed = json.loads(archive.read("calibration.json"))
        words = json.loads(archive.read("words.json"))
    assert packed == json.loads((repo / "models" / "emotion-smoke.calibration.json").read_text())
    assert words == json.loads((repo / "models" / "emotion-smoke.words.json").read_text()) and words["counts"]
    assert "typo_correction" in json.loads((repo / "metrics" / "smoke" / "eval.json").read_text())
    assert json.loads((repo / "metrics" / "smoke" / "calibration.json").read_text())["temperature"] > 0
    assert (repo / "models" / "emotion-smoke" / "model.safetensors").is_file()
    again = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in again
    for stage in ("data", "teacher", "teacher_logits", "train", "calibrate", "profile", "words", "evaluate", "archive"):
        assert f"Stage '{stage}' didn't change, skipping" in again


@pytest.mark.slow
@pytest.mark.integration
def test_changing_a_hyperparameter_reruns_only_what_depends_on_it(workspace):
    repo, env, _, _ = workspace
    config = repo / "training" / "conf" / "train" / "default.yaml"
    config.write_text(config.read_text().replace("lr: 1.0e-4", "lr: 2.0e-4"))
    output = run(["dvc", "repro"], repo, env)
    assert "Stage 'data' didn't change, skipping" in output
    assert "Running stage 'train'" in output
    assert "Running stage 'archive'" in output


def test_teacher_stages_feed_the_student_its_teacher_logits():
    paths = stage_paths("distill", teacher="full")
    assert {"models/teacher-full", "data/processed/train.txt"} <= paths["teacher_logits"]
    assert "data/teacher/full.npz" in paths["teacher_logits"] and "data/teacher/full.npz" in paths["train"]
    assert "models/teacher-full" in paths["teacher"]


def test_teacher_depends_on_all_training_code_and_its_own_experiment_only():
    paths = stage_paths("distill", teacher="mpnet")["teacher"]
    training = PROJECT_ROOT / "training"
    # Every module the fine-tune may import; the data, calibrate and words stages' and the speed script are
    # not among them.
    modules = {p.relative_to(PROJECT_ROOT).as_posix() for p in training.glob("*.py")}
    modules -= {
        "training/prepare.py",
        "training/hub.py",
        "training/speed.py",
        "training/calibrate.py",
        "training/words.py",
    }
    assert modules <= paths
    groups = {p.relative_to(PROJECT_ROOT).as_posix() for p in (training / "conf").iterdir() if p.is_dir()}
    assert groups - {"training/conf/experiment", "training/conf/hparams_search"} <= paths
    assert "training/conf/experiment/mpnet.yaml" in paths
    assert not {"training", "training/conf", "training/conf/experiment"} & paths


@pytest.mark.slow
@pytest.mark.integration
def test_teacher_logits_are_computed_once_for_every_student(workspace):
    repo, env, _, _ = workspace
    params = repo / "params.yaml"
    try:
        params.write_text("experiment: smoke-distill\nteacher: smoke\n")
        first = run(["dvc", "repro", "train"], repo, env)
        assert "Running stage 'teacher'" in first and "Running stage 'teacher_logits'" in first
        cached = TeacherLogits.load(repo / "data" / "teacher" / "smoke.npz")
        assert cached.teacher == "smoke" and len(cached.texts) == len(set(cached.texts)) > 0
        assert (
            json.loads((repo / "metrics" / "smoke-distill" / "train.json").read_text())["distill"]["teacher"] == "smoke"
        )

        params.write_text("experiment: smoke-distill4\nteacher: smoke\n")
        second = run(["dvc", "repro", "train"], repo, env)
        assert "Stage 'teacher' didn't change, skipping" in second
        assert "Stage 'teacher_logits' didn't change, skipping" in second
        assert "Running stage 'train'" in second
        student = json.loads((repo / "metrics" / "smoke-distill4" / "train.json").read_text())
        assert student["distill"] == {"teacher": "smoke", "temperature": 2.0, "alpha": 0.5, "schedule": "linear"}
        assert (
            json.loads((repo / "models" / "emotion-smoke-distill4" / "config.json").read_text())["num_hidden_layers"]
            == 4
        )
    finally:
        params.write_text("experiment: smoke\nteacher: none\n")
        run(["dvc", "repro"], repo, env)  # back to the workspace the other tests expect


@pytest.mark.slow
@pytest.mark.integration
def test_push_then_pull_into_a_fresh_clone_restores_data_and_model(workspace):
    repo, env, git, remote = workspace
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "pipeline outputs"], repo, env)
    run(["dvc", "push"], repo, env)
    clone = repo.parent / "clone"  # beside the repo, so ../shared resolves the same way
    run(["git", "clone", "-q", str(repo), str(clone)], repo.parent, env)
    run(["dvc", "remote", "add", "--local", "-f", "-d", "testremote", str(remote)], clone, env)
    # A clone has no params.yaml (generated, untracked): `make pull` writes it from dvc.lock first.
    assert not (clone / "params.yaml").exists()
    run(["python3", "project.py", "params", "--from-lock"], clone, env)
    assert "experiment: smoke" in (clone / "params.yaml").read_text()
    run(["dvc", "pull"], clone, env)
    for path in ("data/processed/train.txt", "models/emotion-smoke/model.safetensors", "model_store/emotion.mar"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone, env)
