"""Shared fixtures: tiny configs, a tiny trained model, its archive, and a live TorchServe."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

from training.config import compose

from .helpers import FIXTURE_DATA, chromium_executable, make_stack, running_torchserve, start_ready, tiny_overrides

TIERS = ("integration", "slow")  # unit: neither
_started = time.monotonic()
_tier_seconds: dict[str, float] = defaultdict(float)
_tier_counts: dict[str, int] = defaultdict(int)


def tier(item: pytest.Item) -> str:
    """``integration`` (real servers or tools), else ``slow``, else ``unit``."""
    return next((name for name in TIERS if item.get_closest_marker(name)), "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test without a tier marker is a unit test (``pytest -m unit`` runs those alone)."""
    for item in items:
        if tier(item) == "unit":
            item.add_marker(pytest.mark.unit)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    keywords = report.keywords
    name = next((t for t in TIERS if t in keywords), "unit")
    _tier_seconds[name] += report.duration
    if report.when == "call":
        _tier_counts[name] += 1


def pytest_terminal_summary(terminalreporter) -> None:
    """The suite's wall time and each tier's share of it."""
    tiers = ", ".join(
        f"{name} {_tier_counts[name]} tests {_tier_seconds[name] / 60:.1f} min"
        for name in ("unit", *TIERS)
        if _tier_counts[name]
    )
    terminalreporter.write_line(f"suite wall time {(time.monotonic() - _started) / 60:.1f} min ({tiers})")


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    """A training config that runs in seconds and writes only under ``tmp_path``."""
    return compose(tiny_overrides(tmp_path))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory produced by a real (tiny) training run, shared by the session: one epoch
    of the fixture split at a high learning rate, so that its answers depend on the text (top-two
    margins of 0.1-0.3), which the readiness tests need to tell a broken model from a good one."""
    from training.train import train

    root = tmp_path_factory.mktemp("tiny-run")
    train(compose(tiny_overrides(root, steps=9, lr=1e-3)))
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
    with running_torchserve(model_store, tmp_path / "ts") as server:
        yield server


@pytest.fixture(scope="module")
def stack(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The whole service on the tiny model, started and ready, shared by a module's tests; always
    stopped. (A module that needs its own per test, or other settings, defines its own.)"""
    running = make_stack(model_store, tmp_path_factory.mktemp("stack") / "stack")
    try:
        yield start_ready(running)
    finally:
        running.stop()


@pytest.fixture(scope="session")
def fixture_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the fixture splits."""
    target = tmp_path_factory.mktemp("data")
    for name in ("train.txt", "val.txt"):
        shutil.copy(FIXTURE_DATA / name, target / name)
    return target


@pytest.fixture
def browser() -> Iterator:
    """A headless Chromium driven by Playwright, for the pages people read (the docs site, the
    gateway's API page). Debian's Chromium: ``make system-deps`` installs it. One per test:
    Playwright's synchronous API runs an event loop in this thread while it is open, and a later
    test's ``asyncio.run`` must not find it."""
    from playwright.sync_api import sync_playwright

    executable = chromium_executable()
    if executable is None:
        pytest.fail("no Chromium: make system-deps installs it (or set CHROMIUM to its path)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        try:
            yield chromium
        finally:
            chromium.close()
