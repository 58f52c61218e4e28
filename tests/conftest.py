"""Shared fixtures: tiny configs, a tiny trained model, its archive, and a live TorchServe."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

from training.config import compose

from .helpers import FIXTURE_DATA, tiny_overrides


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    """A training config that runs in seconds and writes only under ``tmp_path``."""
    return compose(tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory produced by a real (tiny) training run, shared by the session."""
    from training.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    train(compose(tiny_overrides(root)))
    return root / "model"


@pytest.fixture(scope="session")
def model_store(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding ``emotion.mar`` built from the tiny model."""
    from serving.archive import build_archive

    store = tmp_path_factory.mktemp("model-store")
    build_archive(tiny_model_dir, store)
    return store


@pytest.fixture
def torchserve(model_store: Path, tmp_path: Path) -> Iterator:
    """A real TorchServe on free loopback ports serving ``emotion``; always stopped."""
    from serving.server import TorchServe

    server = TorchServe(model_store, tmp_path / "ts")
    try:
        server.start(timeout=180)
    except Exception:
        print(server.log_tail())
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fixture_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the fixture splits."""
    target = tmp_path_factory.mktemp("data")
    for name in ("train.txt", "val.txt"):
        shutil.copy(FIXTURE_DATA / name, target / name)
    return target
