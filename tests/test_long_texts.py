"""Texts longer than the model's window: truncated by default, or cut into overlapping windows
whose probabilities are averaged (``handler.long_texts: chunk``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from emotion_handler import EmotionHandler
from emotion_settings import HandlerSettings
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import make_context, run_batch

pytestmark = pytest.mark.slow

WINDOW = 32  # tokens, special tokens included
OVERLAP = 8
HAPPY = "i feel so happy and delighted with my wonderful friends today. "
ANGRY = "i am furious and bitter, everyone here keeps insulting me again. "
CALM = "the weather report says light rain is expected over the hills tomorrow. "


def handler_with(model_dir, **section) -> EmotionHandler:
    handler = EmotionHandler()
    handler.initialize(make_context(model_dir, {"max_length": WINDOW, **section}))
    return handler


@pytest.fixture(scope="module")
def chunking(tiny_model_dir):
    return handler_with(tiny_model_dir, long_texts="chunk", chunk_overlap=OVERLAP, max_chunks=8)


@pytest.fixture(scope="module")
def truncating(tiny_model_dir):
    return handler_with(tiny_model_dir)


def answer(handler: EmotionHandler, text: str) -> dict:
    ((status, body),) = run_batch(handler, handler.context, [(text, "text/plain")])
    assert status == 200, body
    return body


def vector(body: dict) -> np.ndarray:
    return np.array(list(body["probabilities"].values()))


def test_the_windows_overlap_and_cover_the_whole_text(chunking):
    engine = chunking.engine
    text = HAPPY * 3 + ANGRY * 3
    (windows,), (cut,) = engine.windows([text])
    inner = [w[1:-1] for w in windows]  # without [CLS] and [SEP]
    assert len(windows) > 2 and not cut
    assert all(len(w) <= WINDOW for w in windows)
    for before, after in itertools.pairwise(inner):
        assert before[-OVERLAP:] == after[:OVERLAP]
    engine.tokenizer.backend.no_truncation()  # (each encoding sets it again)
    whole = engine.tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert inner[0] + [t for w in inner[1:] for t in w[OVERLAP:]] == whole


def test_a_two_halves_text_is_the_mean_of_its_windows_and_its_second_half_counts(chunking, truncating):
    engine = chunking.engine
    text = HAPPY * 3 + ANGRY * 3
    (windows,), _ = engine.windows([text])
    alone = np.stack([engine.forward([w])[0][0] for w in windows])
    chunked = answer(chunking, text)
    assert not chunked["truncated"]
    # Each window weighs the tokens it adds: every token of the text counts once.
    weights = np.array([len(w) - (OVERLAP if i else 0) for i, w in enumerate(windows)], dtype=float)
    np.testing.assert_allclose(vector(chunked), weights @ alone / weights.sum(), atol=1e-5)
    assert chunked["label"] == max(chunked["probabilities"], key=chunked["probabilities"].get)
    # Truncated, the answer is the first window's, whatever the second half says; chunked, the
    # second half moves it.
    truncated = answer(truncating, text)
    assert truncated["truncated"]
    np.testing.assert_allclose(vector(truncated), alone[0], atol=1e-5)
    other = HAPPY * 3 + CALM * 3
    np.testing.assert_allclose(vector(answer(truncating, other)), vector(truncated), atol=1e-6)
    assert np.abs(vector(answer(chunking, other)) - vector(chunked)).max() > 1e-4


def test_a_text_that_fits_gets_the_same_answer_either_way(chunking, truncating):
    np.testing.assert_allclose(vector(answer(chunking, HAPPY)), vector(answer(truncating, HAPPY)), atol=1e-6)


def test_windows_past_max_chunks_are_cut_and_said(tiny_model_dir):
    capped = handler_with(tiny_model_dir, long_texts="chunk", chunk_overlap=OVERLAP, max_chunks=2)
    body = answer(capped, HAPPY * 4 + ANGRY * 4)
    assert body["truncated"]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from([HAPPY, ANGRY, CALM]), min_size=1, max_size=8))
def test_any_batch_of_long_and_short_texts_gets_each_texts_own_mean(chunking, halves):
    """Texts of one, two or many windows batched together: each answer is the one it gets alone."""
    texts = ["".join(halves), HAPPY, "".join(reversed(halves))]
    together = run_batch(chunking, chunking.context, [(t, "text/plain") for t in texts])
    for text, (status, body) in zip(texts, together, strict=True):
        assert status == 200
        np.testing.assert_allclose(vector(body), vector(answer(chunking, text)), atol=1e-5)


@pytest.mark.parametrize(
    "section",
    [
        {"long_texts": "split"},
        {"chunk_overlap": -1},
        {"max_chunks": 0},
        {"long_texts": "chunk", "max_length": 16, "chunk_overlap": 14},
    ],
)
def test_bad_long_text_settings_are_refused(section):
    with pytest.raises(ValueError, match="handler\\."):
        HandlerSettings.from_yaml(section)
