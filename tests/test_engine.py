"""The handler's engine without TorchServe: its tokenizer gives transformers' ids and truncation
flags without importing transformers, and ``predict`` answers as the handler does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from emotion_engine import EmotionEngine, FastTokenizer, TransformersTokenizer, load_tokenizer
from emotion_settings import HandlerSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from project import HANDLER_DIR
from tests.helpers import FIXTURE_DATA

VAL_TEXTS = [line.rsplit(";", 1)[0] for line in (FIXTURE_DATA / "val.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dir):
    return FastTokenizer(tiny_model_dir), TransformersTokenizer(tiny_model_dir)


@pytest.mark.parametrize("max_length", [8, 32, 128])
def test_fast_tokenizer_matches_transformers_on_validation_texts(tokenizers, max_length):
    fast, reference = tokenizers
    texts = [*VAL_TEXTS, "i feel " + "very " * 200 + "sad", "a"]
    assert fast.encode(texts, max_length) == reference.encode(texts, max_length)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=200), min_size=1, max_size=8), max_length=st.integers(4, 64))
def test_fast_tokenizer_matches_transformers_on_any_text(tokenizers, texts, max_length):
    fast, reference = tokenizers
    assert fast.encode(texts, max_length) == reference.encode(texts, max_length)


def test_fast_tokenizer_reads_special_tokens_and_window_like_transformers(tokenizers):
    fast, reference = tokenizers
    for name in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "model_max_length"):
        assert getattr(fast, name) == getattr(reference, name), name
    assert fast.convert_tokens_to_ids("happy") == reference.convert_tokens_to_ids("happy")


def test_a_directory_without_tokenizer_json_falls_back_to_transformers(tiny_model_dir, tmp_path):
    slow = tmp_path / "model"
    shutil.copytree(tiny_model_dir, slow)
    (slow / "tokenizer.json").unlink()
    if not (slow / "vocab.txt").exists():  # a slow tokenizer needs the vocabulary file
        vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        (slow / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    tokenizer = load_tokenizer(slow)
    assert isinstance(tokenizer, TransformersTokenizer)
    ids, truncated = tokenizer.encode(["i feel " + "very " * 40 + "sad", "hi"], 16)
    assert [len(row) for row in ids] == [16, 3] and truncated == [True, False]


def test_the_onnx_worker_path_never_imports_transformers(tiny_model_dir, tmp_path):
    from serving.archive import build_archive

    store = build_archive(tiny_model_dir, tmp_path / "store", without_weights=True)
    unpacked = tmp_path / "engine"
    shutil.unpack_archive(store, unpacked, format="zip")
    probe = (
        "import sys; from emotion_engine import EmotionEngine; from emotion_settings import HandlerSettings;"
        f"e = EmotionEngine({str(unpacked)!r}, HandlerSettings(backend='onnx', precision='int8', sort_by_length=True));"
        "print(e.predict(['i feel fine'])[0]['label'] in e.labels, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=HANDLER_DIR, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_predict_answers_each_text_in_order(tiny_model_dir):
    engine = EmotionEngine(tiny_model_dir, HandlerSettings(sort_by_length=True, pass_cost_tokens=0))
    texts = ["a " * n + "happy" for n in (9, 1, 5)]
    together = engine.predict(texts)
    for text, answer in zip(texts, together, strict=True):
        alone = engine.predict([text])[0]
        assert answer["label"] == alone["label"]
        assert answer["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1, abs=1e-5)
