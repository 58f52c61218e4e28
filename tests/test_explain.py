"""Occlusion (``serving.explain``) on a scripted model: the attributions are the differences they
claim to be, the cost is bounded, and a request is read like a prediction's."""

from __future__ import annotations

import json

import pytest
from emotion_inputs import InputError
from hypothesis import given, settings
from hypothesis import strategies as st

from project import LABELS
from serving.explain import ExplainProcess, occlusion, read_request


def scripted(texts: list[str]) -> list[dict]:
    """A model whose joy is the share of the words "happy" among the text's words."""
    answers = []
    for text in texts:
        words = text.split()
        if not words:
            answers.append({"code": 400, "type": "EmptyText", "message": "no text", "error": "no text"})
            continue
        joy = words.count("happy") / len(words)
        rest = (1 - joy) / (len(LABELS) - 1)
        probabilities = {k: (joy if k == "joy" else rest) for k in LABELS}
        answers.append({"label": max(probabilities, key=probabilities.get), "probabilities": probabilities})
    return answers


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["happy", "sad", "day", "the"]), min_size=1, max_size=20), st.integers(1, 30))
def test_each_attribution_is_the_fall_without_that_word(words, max_words):
    text = " ".join(words)
    calls: list[int] = []

    def predict(texts):
        calls.append(len(texts))
        return scripted(texts)

    answer = occlusion(predict, text, "joy", max_words)
    full = scripted([text])[0]["probabilities"]["joy"]
    assert answer["score"] == full and answer["label"] == "joy"
    assert answer["explained_words"] == len(answer["words"]) == min(len(words), max_words)
    assert answer["words_in_text"] == len(words)
    for i, item in enumerate(answer["words"]):
        without = scripted([" ".join(words[:i] + words[i + 1 :])])[0]
        expected = full - (without["probabilities"]["joy"] if "probabilities" in without else 0.0)
        assert item == {"word": words[i], "attribution": pytest.approx(expected, abs=1e-6)}
    assert sum(calls) == 1 + min(len(words), max_words)  # bounded: one pass per explained word


def test_the_predicted_label_is_explained_when_none_is_asked_and_a_bad_text_is_refused():
    assert occlusion(scripted, "happy happy day", None)["label"] == "joy"
    with pytest.raises(InputError):
        occlusion(scripted, "   ", None)


def test_a_request_is_read_like_a_predictions():
    assert read_request(b"i feel fine", "text/plain") == ("i feel fine", None)
    body = json.dumps({"text": "i feel fine", "label": "joy"}).encode()
    assert read_request(body, "application/json") == ("i feel fine", "joy")
    for raw, kind in [(b"{", "MalformedJSON"), (b'{"text": "x", "label": "bored"}', "InvalidType"), (b"[]", None)]:
        with pytest.raises(InputError) as refused:
            read_request(raw, "application/json")
        assert kind is None or refused.value.kind == kind


def test_a_service_that_keeps_exiting_is_not_restarted_every_round(tmp_path):
    process = ExplainProcess(tmp_path / "missing.mar", 1, tmp_path / "explain.log")
    assert process.due_for_restart()  # never started
    process.started_at = float("inf")  # just started
    assert not process.due_for_restart()
