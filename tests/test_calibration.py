"""Temperature scaling and abstaining: the fit and its figures (training/calibrate.py), the
temperature as the engine, the handler and the archive apply it, and the abstain threshold."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from emotion_engine import CALIBRATION_FILE, EmotionEngine, read_temperature
from emotion_inputs import InputError, abstain_threshold
from emotion_settings import HandlerSettings
from hypothesis import given, settings
from hypothesis import strategies as st

from training.calibrate import (
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
    plot_risk_coverage,
    risk_coverage,
    softmax,
)

from .helpers import make_context, run_batch


def sampled(temperature: float, n: int = 20_000, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from ``softmax(logits / temperature)``: calibrated at that temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, classes))
    probabilities = softmax(logits, temperature)
    labels = np.array([rng.choice(classes, p=row) for row in probabilities])
    return logits, labels


@pytest.mark.parametrize("truth", [0.5, 1.0, 2.5])
def test_the_fit_finds_the_temperature_the_labels_were_drawn_at(truth):
    logits, labels = sampled(truth)
    assert fit_temperature(logits, labels) == pytest.approx(truth, rel=0.06)


def test_scaling_keeps_the_ranking_and_lowers_the_calibration_error_on_held_out_texts():
    logits, labels = sampled(2.0, n=8_000, seed=1)  # a model twice as confident as it should be
    report = calibration_report(logits, labels)
    before, after = report["held_out_two_fold"]["before"], report["held_out_two_fold"]["after"]
    assert after["accuracy"] == before["accuracy"]  # T > 0 never changes the top label
    assert after["ece"] < before["ece"] / 2 and after["brier"] < before["brier"] and after["nll"] < before["nll"]
    assert all(t == pytest.approx(2.0, rel=0.1) for t in report["held_out_two_fold"]["fold_temperatures"])


def test_calibration_error_and_brier_score_on_cases_worked_by_hand():
    # Every answer at confidence 0.9, six of ten right: one bin, a gap of 0.3.
    probabilities = np.tile([0.9, 0.02, 0.02, 0.02, 0.02, 0.02], (10, 1))
    labels = [0] * 6 + [1] * 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.3)
    onehot = np.eye(6)[[0, 3, 5]]
    assert brier_score(onehot, [0, 3, 5]) == 0.0
    assert brier_score(np.full((2, 6), 1 / 6), [1, 4]) == pytest.approx(5 / 36 + 25 / 36)
    assert brier_score(onehot, [1, 4, 0]) == pytest.approx(2.0)  # all wrong and sure: the maximum


@given(
    rows=st.lists(st.lists(st.floats(-20, 20), min_size=6, max_size=6), min_size=1, max_size=60),
    data=st.data(),
)
@settings(max_examples=60, deadline=None)
def test_risk_coverage_answers_fewer_texts_as_the_threshold_rises(rows, data):
    logits = np.array(rows)
    labels = data.draw(st.lists(st.integers(0, 5), min_size=len(rows), max_size=len(rows)))
    table = risk_coverage(softmax(logits), labels, thresholds=(0.0, 0.3, 0.6, 0.9, 1.0 + 1e-9))
    coverage = [r["coverage"] for r in table]
    assert coverage[0] == 1.0 and coverage[-1] == 0.0 and coverage == sorted(coverage, reverse=True)
    correct = softmax(logits).argmax(axis=1) == np.array(labels)
    assert table[0]["accuracy"] == pytest.approx(correct.mean()) and table[-1]["accuracy"] is None
    for row in table:  # errors among all texts: answered and wrong
        assert row["error_rate"] <= row["coverage"] + 1e-12


@pytest.mark.parametrize(
    ("logits", "labels"), [(np.zeros((0, 6)), []), (np.zeros((3, 6)), [0, 1]), (np.zeros((2, 6)), [0, 6])]
)
def test_the_fit_refuses_logits_and_labels_that_do_not_match(logits, labels):
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(logits, labels)


def test_the_plots_are_written(tmp_path):
    logits, labels = sampled(1.5, n=500)
    report = calibration_report(logits, labels)
    for path in (
        plot_reliability(logits, labels, report["temperature"], tmp_path / "a" / "reliability.png"),
        plot_risk_coverage(report["risk_coverage"], tmp_path / "b" / "risk_coverage.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "content",
    [
        *('{"temperature": 0}', '{"temperature": -1.5}', '{"temperature": "2"}', '{"temperature": true}'),
        *('{"temperature": NaN}', '{"temperature": Infinity}', "{}", "[]", "not json"),
    ],
)
def test_a_calibration_file_without_a_positive_finite_temperature_is_refused(tmp_path, content):
    (tmp_path / CALIBRATION_FILE).write_text(content)
    with pytest.raises(ValueError, match="temperature"):
        read_temperature(tmp_path / CALIBRATION_FILE)


def test_no_calibration_file_is_the_model_as_trained(tmp_path):
    assert read_temperature(tmp_path / CALIBRATION_FILE) == 1.0


@pytest.fixture(scope="module")
def calibrated_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's folder with a calibration file at temperature 2.5."""
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / CALIBRATION_FILE).write_text(json.dumps({"temperature": 2.5}))
    return folder


@pytest.mark.slow
def test_the_engine_divides_the_logits_by_the_archived_temperature(calibrated_dir, tiny_model_dir):
    fp32 = HandlerSettings(backend="torch", precision="fp32")
    scaled, plain = EmotionEngine(calibrated_dir, fp32), EmotionEngine(tiny_model_dir, fp32)
    assert (scaled.temperature, plain.temperature) == (2.5, 1.0)
    texts = ["i feel so delighted today", "i am terrified of what comes next", "meh"]
    for text, answer, reference in zip(texts, scaled.predict(texts), plain.predict(texts), strict=True):
        ids, mask = plain.pad(plain.token_ids([text])[0])
        logits = plain.model(ids, mask)
        assert list(answer["probabilities"].values()) == pytest.approx(softmax(logits, 2.5)[0].tolist(), abs=1e-5)
        assert answer["label"] == reference["label"]  # the ranking is the model's
        assert answer["score"] <= reference["score"] + 1e-6  # T > 1 softens


@given(
    probabilities=st.lists(st.floats(0, 1), min_size=6, max_size=6).filter(lambda p: sum(p) > 0),
    threshold=st.floats(0, 1),
    truncated=st.booleans(),
)
def test_an_answer_abstains_exactly_when_its_top_probability_is_below_the_threshold(
    probabilities, threshold, truncated
):
    engine = EmotionEngine.__new__(EmotionEngine)  # answer() reads the labels only
    engine.labels = ["sadness", "joy", "love", "anger", "fear", "surprise"]
    total = sum(probabilities)
    row = [p / total for p in probabilities]
    body = engine.answer(row, truncated, threshold)
    assert body["abstained"] == (max(row) < threshold)
    assert body["label"] == (None if body["abstained"] else engine.labels[row.index(max(row))])
    assert body["score"] == max(row) and list(body["probabilities"].values()) == row
    assert body["truncated"] == truncated


@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=12)))
def test_the_abstain_header_is_a_number_from_0_to_1_or_a_400(value):
    headers = {"X-Emotion-Abstain-Below": value}
    try:
        expected = float(value.strip())
    except ValueError:
        expected = math.nan
    if 0.0 <= expected <= 1.0:
        assert abstain_threshold(headers, 0.4) == expected
    else:
        with pytest.raises(InputError) as caught:
            abstain_threshold(headers, 0.4)
        assert caught.value.status == 400 and caught.value.kind == "InvalidAbstainThreshold"
    assert abstain_threshold({"Other": value}, 0.4) == 0.4  # no header: the deployment's threshold


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, True, "0.5", None])
def test_the_deployment_threshold_is_checked_when_the_settings_are_read(value):
    with pytest.raises((ValueError, TypeError), match="abstain_below"):
        HandlerSettings.from_yaml({"abstain_below": value})


@pytest.mark.slow
def test_the_handler_abstains_by_deployment_and_by_request_and_never_on_the_probe(calibrated_dir):
    from emotion_handler import EmotionHandler

    context = make_context(calibrated_dir, {"backend": "torch", "abstain_below": 0.99})
    handler = EmotionHandler()
    handler.initialize(context)
    text = ("i feel a little bit lost today", "text/plain")
    results = run_batch(
        handler,
        context,
        [
            text,  # the deployment's 0.99: the tiny model is never that sure, at T = 2.5 still less
            (*text, {"X-Emotion-Abstain-Below": "0"}),
            (*text, {"X-Emotion-Abstain-Below": "1.5"}),
            (*text, {"X-Emotion-Probe": "readiness"}),
        ],
    )
    (s1, abstained), (s2, answered), (s3, refused), (s4, probe) = results
    assert (s1, s2, s3, s4) == (200, 200, 400, 200)
    assert abstained["abstained"] is True and abstained["label"] is None and len(abstained["probabilities"]) == 6
    assert answered["abstained"] is False and answered["label"] == max(
        answered["probabilities"], key=answered["probabilities"].get
    )
    assert abstained["probabilities"] == answered["probabilities"]
    assert refused["type"] == "InvalidAbstainThreshold"
    assert probe["abstained"] is False and probe["label"] is not None
