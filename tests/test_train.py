"""Training smoke run, outputs, and reproducibility."""

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from training.config import compose
from training.data import LABELS
from training.train import AT_LEAST_ONE, AT_LEAST_ONE_OR_NONE, check_config, train

from .helpers import tiny_overrides

pytestmark = pytest.mark.slow


def test_smoke_run_writes_model_metrics_and_provenance(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg)
    model_dir = tmp_path / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(6)] == list(LABELS)
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        assert "classifier.weight" in weights.keys()  # noqa: SIM118 (safe_open has no __contains__)
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["model_max_length"] == 32

    written = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert written["accuracy"] == pytest.approx(metrics["accuracy"])
    assert 0.0 <= written["macro_f1"] <= 1.0
    assert set(written["per_class_f1"]) == set(LABELS)
    assert sum(map(sum, written["confusion_matrix"])) == 36
    assert written["steps"] == 6
    for plot in ("training_curves.png", "train_confusion_matrix.png"):
        assert (tmp_path / "metrics" / "plots" / plot).read_bytes()[:4] == b"\x89PNG"

    meta = json.loads((model_dir / "training_meta.json").read_text())
    assert meta["config"]["train"]["max_steps"] == 6
    assert set(meta["data_md5"]) == {"train.txt", "val.txt"}
    assert meta["git_commit"]


def test_same_seed_same_metrics(tmp_path):
    runs = [train(compose(tiny_overrides(tmp_path / name))) for name in ("a", "b")]
    assert round(runs[0]["accuracy"], 3) == round(runs[1]["accuracy"], 3)
    assert round(runs[0]["macro_f1"], 3) == round(runs[1]["macro_f1"], 3)
    assert runs[0]["confusion_matrix"] == runs[1]["confusion_matrix"]


def test_offline_wandb_run_is_written_and_finished(tmp_path):
    cfg = compose(tiny_overrides(tmp_path, "logger=wandb", "logger.mode=offline", "logger.log_model=false"))
    train(cfg)
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


def test_missing_data_file_fails_with_clear_message(tmp_path):
    cfg = compose(tiny_overrides(tmp_path, f"data.train_file={tmp_path / 'nope.txt'}"))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        train(cfg)


@pytest.mark.parametrize("key", [*AT_LEAST_ONE, *AT_LEAST_ONE_OR_NONE, "train.lr", "train.max_length"])
@given(number=st.integers(max_value=0) | st.floats(max_value=0, allow_nan=False) | st.just(True))
@settings(max_examples=25, deadline=None)
def test_settings_no_run_can_train_with_are_refused_by_name(key, number):
    cfg = compose([f"{key}={number}"])
    with pytest.raises(ValueError, match=re.escape(key)):
        check_config(cfg)


@pytest.mark.parametrize("override", ["train.epochs=0", "train.max_length=600"])
def test_a_refused_run_leaves_the_last_model_as_it_was(tmp_path, override):
    last = tmp_path / "model" / "model.safetensors"
    last.parent.mkdir()
    last.write_bytes(b"the last run's weights")
    with pytest.raises(ValueError, match=re.escape(override.split("=")[0])):
        train(compose(tiny_overrides(tmp_path, override)))
    assert [p.name for p in last.parent.iterdir()] == [last.name]
    assert last.read_bytes() == b"the last run's weights"


def test_a_world_of_more_ranks_than_batches_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """20 examples make one batch of 32; shared by two ranks, neither would make a step."""
    import training.train as train_module
    from training.runtime import Runtime

    real_setup = train_module.setup_runtime

    def two_ranks(seed, threads):
        real_setup(seed, threads)
        return Runtime(rank=0, world_size=2)

    monkeypatch.setattr(train_module, "setup_runtime", two_ranks)
    cfg = compose(tiny_overrides(tmp_path, "data.max_train_examples=20", "train.batch_size=32"))
    with pytest.raises(ValueError, match=r"20 training examples make no batch of 32 for each of 2 rank"):
        train(cfg)
    assert not (tmp_path / "model").exists()


def test_a_subset_missing_a_class_is_warned_about(tmp_path, caplog):
    cfg = compose(tiny_overrides(tmp_path, "data.max_val_examples=2", "train.max_steps=1"))
    with caplog.at_level("WARNING", logger="training.train"):
        train(cfg)
    assert any("validation examples hold no" in r.getMessage() for r in caplog.records)


def test_pruned_fine_tune_starts_from_a_trained_model_and_keeps_its_lowest_layers(tiny_model_dir, tmp_path):
    cfg = compose(
        tiny_overrides(tmp_path, "experiment=pruned", f"model.pretrained={tiny_model_dir}", "model.keep_layers=2")
    )
    train(cfg)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    with (
        safe_open(tmp_path / "model" / "model.safetensors", "pt") as weights,
        safe_open(tiny_model_dir / "model.safetensors", "pt") as parent,
    ):
        names = set(weights.keys())
        assert any(".layer.1." in name for name in names)
        assert not any(".layer.2." in name for name in names)
        assert "classifier.weight" in names
        assert (
            parent.get_tensor("bert.embeddings.word_embeddings.weight").shape
            == weights.get_tensor("bert.embeddings.word_embeddings.weight").shape
        )


@pytest.mark.parametrize("count", [0, 7])
def test_pruning_rejects_impossible_layer_counts(tiny_model_dir, count):
    from transformers import AutoModelForSequenceClassification

    from training.pruning import keep_bottom_layers

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="between 1 and 6"):
        keep_bottom_layers(model, count)


def test_auto_precision_is_the_cpu_modules_choice_and_an_explicit_one_wins():
    from training.runtime import cpu, resolve_precision

    assert resolve_precision("auto") == cpu().training_precision  # per CPU: tests/test_cpu.py
    assert resolve_precision("bf16") == "bf16"
    assert resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match=r"train\.precision"):
        resolve_precision("fp16")


def test_the_shipped_experiments_pass_the_settings_check():
    for experiment in ("default", "full", "quick", "smoke", "distill", "distill4", "mpnet"):
        check_config(compose([f"experiment={experiment}"]))


def test_the_packaged_backbone_is_verified_and_pickles_are_refused(tmp_path):
    """The default backbone's weights match the committed digest; a changed file or a pickled
    checkpoint is refused before anything loads it."""
    import shutil

    from training.config import PACKAGED_MINILM_SHA256, packaged_minilm_dir, verified_weights

    folder = Path(packaged_minilm_dir())
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert verified_weights(copy, PACKAGED_MINILM_SHA256) == copy
    with (copy / "model.safetensors").open("r+b") as weights:
        weights.seek(-1, 2)
        last = weights.read(1)
        weights.seek(-1, 2)
        weights.write(bytes([last[0] ^ 1]))
    with pytest.raises(RuntimeError, match="SHA-256"):
        verified_weights(copy, PACKAGED_MINILM_SHA256)
    (copy / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(RuntimeError, match="pickled"):
        verified_weights(copy, PACKAGED_MINILM_SHA256)
