"""Building the model archive."""

import json
import zipfile

import pytest

from serving.archive import ArchiveError, build_archive, main

pytestmark = pytest.mark.slow


def test_archive_holds_weights_tokenizer_config_and_handler(model_store):
    with zipfile.ZipFile(model_store / "emotion.mar") as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "model-config.yaml",
        "emotion_handler.py",
        "emotion_inputs.py",
        "emotion_batch.py",
        "emotion_settings.py",
        "emotion_backends.py",
        "emotion_onnx.py",
        "emotion_metrics.py",
    } <= names
    assert manifest["model"]["modelName"] == "emotion"
    assert manifest["model"]["handler"] == "emotion_handler.py"


def test_incomplete_model_dir_is_refused(tmp_path):
    with pytest.raises(ArchiveError, match=r"model\.safetensors"):
        build_archive(tmp_path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
    assert main(["--model-dir", str(tmp_path), "--export-dir", str(tmp_path / "store")]) == 1


def test_cli_builds_a_versioned_archive(tiny_model_dir, tmp_path, capsys):
    assert (
        main(
            [
                "--model-dir",
                str(tiny_model_dir),
                "--export-dir",
                str(tmp_path),
                "--name",
                "emotion-v2",
                "--version",
                "2.0",
            ]
        )
        == 0
    )
    with zipfile.ZipFile(tmp_path / "emotion-v2.mar") as archive:
        assert json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "2.0"
