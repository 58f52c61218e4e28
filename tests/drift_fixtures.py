"""Fixtures shared by the drift tests: the tiny model's reference profile and an archive packing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "emotion"


@pytest.fixture(scope="session")
def profiled_store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store whose ``emotion.mar`` packs the tiny model's reference profile (written beside it)."""
    from monitoring.profile import build_profile, profile_path
    from serving.archive import build_archive

    profile = build_profile(tiny_model_dir, FIXTURES / "train.txt", FIXTURES / "val.txt")
    profile_path(tiny_model_dir).write_text(json.dumps(profile))
    store = tmp_path_factory.mktemp("profiled-store")
    build_archive(tiny_model_dir, store)
    return store
