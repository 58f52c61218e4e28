"""Fixtures shared by the drift tests: the tiny model's reference profile and an archive packing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

FIXTURES = Path(__file__).parent / "fixtures" / "emotion"


@pytest.fixture(scope="session")
def profiled_store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store whose ``emotion.mar`` packs the tiny model's reference profile (written beside it).

    The archive serves the model in fp32 PyTorch, as the profile scored it: the barely trained
    model's probabilities lie close together, and int8 kernels (which differ between CPUs) would
    flip some of its answers, so an unchanged stream would not read as undrifted on every machine.
    """
    from monitoring.profile import build_profile, profile_path
    from project import HANDLER_DIR
    from serving.archive import build_archive

    profile = build_profile(tiny_model_dir, FIXTURES / "train.txt", FIXTURES / "val.txt")
    profile_path(tiny_model_dir).write_text(json.dumps(profile))
    store = tmp_path_factory.mktemp("profiled-store")
    config = yaml.safe_load((HANDLER_DIR / "model-config.yaml").read_text())
    config["handler"].update(backend="torch", precision="fp32")
    model_config = store / "model-config.yaml"
    model_config.write_text(yaml.safe_dump(config))
    build_archive(tiny_model_dir, store, model_config=model_config)
    model_config.unlink()
    return store
