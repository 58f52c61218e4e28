"""The archive's golden record and the readiness verdict on it (serving/golden.py).

Unit part: the bound, read from the record (margins, tolerance), on generated answers. Integration
part: one real TorchServe serving the tiny model's archive beside broken copies of it (permuted
labels, NaN output, constant output, another tokenizer's ids, truncated weights) and the same
weights on another engine; the readiness check with the good archive's record says which are
the archived model.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from project import HANDLER_DIR, handler_module
from serving.archive import build_archive
from serving.golden import (
    GOLDEN_FILE,
    GOLDEN_TEXTS,
    NOISE_FACTOR,
    TOLERANCE_FLOOR,
    GoldenError,
    GoldenRecord,
    archive_of,
    judge,
    served_record,
    tolerance_for,
)
from serving.health import Readiness
from tests.helpers import running_torchserve

RECORD = GoldenRecord(
    ("decisive", "undecided"),
    ({"joy": 0.7, "fear": 0.2, "love": 0.1}, {"joy": 0.34, "fear": 0.33, "love": 0.33}),
    engine="onnx int8",
    noise=0.025,
    tolerance=0.1,  # |log p - log p_recorded|
)


def answer(row: dict[str, float]) -> dict:
    return {"label": max(row, key=row.__getitem__), "probabilities": row}


def test_the_tolerance_rests_on_the_noise_with_a_floor():
    assert tolerance_for(0.0) == TOLERANCE_FLOOR
    assert tolerance_for(0.05) == pytest.approx(0.2)  # logits within 2 x noise: log-probabilities 4 x


def test_only_a_margin_outside_twice_the_tolerance_decides_the_label():
    assert RECORD.decisive(0) and not RECORD.decisive(1)
    flipped = {"joy": 0.32, "fear": 0.35, "love": 0.33}  # within the tolerance: the label may flip
    assert judge(RECORD, 1, answer(flipped)) is None
    assert judge(RECORD, 0, {"label": "fear", "probabilities": RECORD.probabilities[0]}) is not None


@pytest.mark.parametrize(
    "served, why",
    [
        ({"joy": 0.2, "fear": 0.7, "love": 0.1}, "p(joy)"),  # permuted labels
        ({"joy": 0.7, "fear": 0.2, "love": 0.0}, "p(love)"),  # a probability that collapsed
        ({"joy": 0.7, "fear": -0.2, "love": 0.1}, "probability of 'fear'"),
        ({"joy": float("nan"), "fear": 0.2, "love": 0.1}, "probability of 'joy'"),
        ({"joy": 0.7, "fear": 0.3}, "labels"),  # another label set
        ({"joy": 0.7, "fear": "0.2", "love": 0.1}, "probability of 'fear'"),
        ({"joy": 0.7, "fear": True, "love": 0.1}, "probability of 'fear'"),
    ],
)
def test_answers_of_a_broken_model_are_refused_by_name(served, why):
    assert why in judge(RECORD, 0, {"label": "joy", "probabilities": served})


@pytest.mark.parametrize("body", [None, [], "joy", {"label": "joy"}, {"probabilities": []}])
def test_an_answer_without_probabilities_is_refused(body):
    assert judge(RECORD, 0, body) is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1, 1), min_size=3, max_size=3), st.integers(0, 1))
# A decisive text keeps its label under any such change: its margin exceeds twice the tolerance.
def test_any_change_within_the_tolerance_keeps_the_verdict(shifts, index):
    want = RECORD.probabilities[index]
    served = {label: p * math.exp(RECORD.tolerance * s) for (label, p), s in zip(want.items(), shifts, strict=True)}
    assert judge(RECORD, index, answer(served)) is None


def test_a_record_round_trips_and_bad_ones_are_refused_by_name(tmp_path):
    assert GoldenRecord.from_json(RECORD.to_json()) == RECORD
    for bad in ["{}", "[]", '{"texts": []}', RECORD.to_json().replace('"tolerance": 0.1', '"tolerance": 20')]:
        with pytest.raises(GoldenError, match="golden"):
            GoldenRecord.from_json(bad, "golden.json")
    nan = json.loads(RECORD.to_json())
    nan["texts"][0]["probabilities"]["joy"] = math.nan
    with pytest.raises(GoldenError, match="not finite"):
        GoldenRecord.from_json(json.dumps(nan))
    plain = tmp_path / "plain.mar"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
    with pytest.raises(GoldenError, match="rebuild it"):
        GoldenRecord.from_archive(plain)
    (tmp_path / "junk.mar").write_text("not a zip")
    with pytest.raises(GoldenError, match="cannot be read"):
        GoldenRecord.from_archive(tmp_path / "junk.mar")


@pytest.mark.parametrize(
    "models, archive",
    [
        ("emotion=emotion.mar", "emotion.mar"),
        ("other=a.mar, emotion=v2.mar", "v2.mar"),
        ("emotion.mar", "emotion.mar"),
        ("other=emotion.mar", None),
        ("emotion=https://example.org/emotion", None),
    ],
)
def test_the_served_archive_is_found_in_torchserves_models_argument(models, archive):
    assert archive_of(models, "emotion") == archive


def test_a_store_without_the_archive_gives_no_record_and_says_why(tmp_path):
    record, why = served_record(tmp_path, "emotion=emotion.mar", "emotion")
    assert record is None and "emotion.mar" in why


# --- the record of a real archive, and a different CPU ---------------------------------------------


@pytest.fixture(scope="module")
def archived(model_store: Path) -> GoldenRecord:
    return GoldenRecord.from_archive(model_store / "emotion.mar")


@pytest.fixture(scope="module")
def logit_noise(model_store: Path, tiny_model_dir: Path, tmp_path_factory) -> float:
    """Largest |logit| difference between the archive's int8 engine and fp32 PyTorch on the golden
    texts: the int8 kernel noise, measured here (as the archive measured it when it was built)."""
    unpacked = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(model_store / "emotion.mar") as archive:
        archive.extractall(unpacked)
    settings_cls = handler_module("emotion_settings").HandlerSettings
    engine_cls = handler_module("emotion_engine").EmotionEngine
    int8 = engine_cls(unpacked, settings_cls(backend="onnx", precision="int8"))
    fp32 = engine_cls(tiny_model_dir, settings_cls(backend="torch", precision="fp32"))
    worst = 0.0
    for text in GOLDEN_TEXTS:
        ids, mask = int8.pad(int8.token_ids([text])[0])
        worst = max(worst, float(np.abs(int8.model(ids, mask) - fp32.model(ids, mask)).max()))
    assert worst > 0  # int8 moves the logits: the perturbation below is not empty
    return worst


@pytest.mark.slow
def test_the_archive_records_its_engine_its_noise_and_a_bound_resting_on_it(archived, logit_noise):
    assert archived.texts == GOLDEN_TEXTS and archived.engine == "onnx int8"
    assert archived.noise == pytest.approx(logit_noise, abs=1e-5)
    # Both are stored to 6 decimals: the bound of the rounded noise may differ by its factor times that.
    assert archived.tolerance == pytest.approx(tolerance_for(archived.noise), abs=(NOISE_FACTOR + 1) * 0.5e-6)
    assert archived.cpu.startswith("CPU ")
    for row in archived.probabilities:
        assert sum(row.values()) == pytest.approx(1, abs=1e-4)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_different_cpu_is_the_int8_noise_and_keeps_readiness(archived, logit_noise, seed):
    # Another CPU's int8 kernels move each logit by up to the noise measured between two engines
    # (int8 and fp32 here: another CPU's int8 is as far from fp32 as this one's).
    rng = random.Random(seed)
    for index, row in enumerate(archived.probabilities):
        logits = {label: math.log(p) + rng.uniform(-logit_noise, logit_noise) for label, p in row.items()}
        total = sum(math.exp(v) for v in logits.values())
        moved = {label: math.exp(v) / total for label, v in logits.items()}
        assert judge(archived, index, answer(moved)) is None, (index, logit_noise)


# --- real TorchServe: the archived model is ready, broken copies are not ----------------------------


def rewrite_weights(model_dir: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    change(weights)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def permute_labels(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    rotated = names[1:] + names[:1]
    config["id2label"] = {str(i): name for i, name in enumerate(rotated)}
    config["label2id"] = {name: i for i, name in enumerate(rotated)}
    (model_dir / "config.json").write_text(json.dumps(config))


def nan_output(model_dir: Path) -> None:
    rewrite_weights(model_dir, lambda w: w["classifier.weight"].fill_(float("nan")))


def constant_output(model_dir: Path) -> None:
    def change(weights):
        weights["classifier.weight"].zero_()
        weights["classifier.bias"].copy_(torch.tensor([2.0, 0, 0, 0, 0, 0]))

    rewrite_weights(model_dir, change)


def other_tokenizer(model_dir: Path) -> None:
    # Another vocabulary's ids for the same words: every word piece maps to a shuffled id.
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    words = [token for token, i in vocab.items() if i >= 999]
    ids = [vocab[token] for token in words]
    random.Random(0).shuffle(ids)
    vocab.update(zip(words, ids, strict=True))
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))


def truncated_weights(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN = {
    "permuted": permute_labels,
    "nan": nan_output,
    "constant": constant_output,
    # Not "tokenizer": TorchServe 0.12 takes any management path containing "token" for its
    # key-renewal API and answers 400 for /models/tokenizer.
    "vocabulary": other_tokenizer,
    "truncated": truncated_weights,
}


@pytest.fixture(scope="module")
def variants(tiny_model_dir: Path, model_store: Path, tmp_path_factory) -> Path:
    """A store with the good archive, the same weights on fp32 PyTorch (``fp32``), and copies of
    that archive with one of its files broken after it was built (one worker each); ``permuted-own``
    is built from the permuted model directory, so it carries its own record."""
    store = tmp_path_factory.mktemp("variants")
    shutil.copy(model_store / "emotion.mar", store / "emotion.mar")
    config = tmp_path_factory.mktemp("config") / "model-config.yaml"
    shipped = (HANDLER_DIR / "model-config.yaml").read_text()
    config.write_text(
        shipped.replace("minWorkers: 2", "minWorkers: 1")
        .replace("maxWorkers: 2", "maxWorkers: 1")
        .replace("backend: onnx", "backend: torch")
        .replace("precision: int8", "precision: fp32")
    )
    fp32 = build_archive(tiny_model_dir, store, name="fp32", model_config=config)
    for name, breakage in BROKEN.items():
        model_dir = tmp_path_factory.mktemp(name) / "model"
        shutil.copytree(tiny_model_dir, model_dir)
        breakage(model_dir)
        repack(fp32, store / f"{name}.mar", model_dir)
        if name == "permuted":
            build_archive(model_dir, store, name="permuted-own", model_config=config)
    return store


def repack(archive: Path, target: Path, model_dir: Path) -> None:
    """A copy of ``archive`` with its model files replaced by those of ``model_dir``."""
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(target, "w") as copy:
        for item in source.infolist():
            replacement = model_dir / item.filename
            copy.writestr(item, replacement.read_bytes() if replacement.is_file() else source.read(item))


@pytest.fixture(scope="module")
def served_variants(variants: Path, tmp_path_factory):
    models = ",".join(f"{p.stem}={p.name}" for p in sorted(variants.glob("*.mar")))
    ready = ("fp32", "permuted-own", *[n for n in BROKEN if n != "truncated"])
    with running_torchserve(variants, tmp_path_factory.mktemp("ts"), models, 300, ready) as server:
        yield server


def verdict(server, model: str, record: GoldenRecord):
    """The readiness state after a golden check with a verdict (a busy or slow answer gives none:
    the check is repeated, as the supervisor would, up to five times)."""
    readiness = Readiness(server.client, model, record, golden_timeout=30)
    for attempt in range(5):
        state = readiness.check(attempt * readiness.golden_interval)
        readiness.wait_golden(300)
        if not state.up or readiness.state.golden_ok is not None:
            break
    return readiness.state


@pytest.mark.integration
@pytest.mark.slow
def test_the_archived_model_is_ready_on_either_engine_and_every_broken_copy_is_not(served_variants, variants):
    good = GoldenRecord.from_archive(variants / "emotion.mar")
    assert verdict(served_variants, "emotion", good).ready
    # The same weights on fp32 PyTorch: another engine's noise, still the archived model.
    assert verdict(served_variants, "fp32", good).ready
    for name in BROKEN:
        state = verdict(served_variants, name, good)
        print(f"{name}: {state.golden_seen}")
        assert not state.ready, (name, state)
        if name == "truncated":
            assert not state.up  # the worker cannot load it
        else:
            assert state.golden_ok is False and "golden text" in state.golden_seen, (name, state)


@pytest.mark.integration
@pytest.mark.slow
def test_each_archive_is_ready_against_its_own_record(served_variants, variants):
    # A broken model archived as it is (its record made from it) is what was archived: the record
    # guards the served model against the archive, not the archive's quality (that is evaluate's).
    own = GoldenRecord.from_archive(variants / "permuted-own.mar")
    assert verdict(served_variants, "permuted-own", own).ready
    assert not verdict(served_variants, "permuted-own", GoldenRecord.from_archive(variants / "emotion.mar")).ready
    assert GOLDEN_FILE in zipfile.ZipFile(variants / "permuted-own.mar").namelist()
