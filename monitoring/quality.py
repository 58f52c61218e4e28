"""How right a classifier's probabilities are, given the true labels: accuracy, per-class
precision, recall and F1, the confusion counts, expected calibration error and Brier score.

One implementation for offline and live figures: ``training.calibrate`` scores the validation
split with it before and after temperature scaling, and the feedback service
(``serving.feedback``) scores the last labelled answers it joined to their served probabilities.
NumPy only, so that the gateway's supervisor can import it without PyTorch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 10


def reliability_bins(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> list[tuple]:
    """For each non-empty one of ``bins`` equal-width confidence bins (a bin holds ``(lo, hi]``):
    the share of answers in it, their mean confidence (top probability) and their accuracy."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for lo, hi in itertools.pairwise(edges):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            rows.append((float(inside.mean()), float(confidence[inside].mean()), float(correct[inside].mean())))
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """ECE: the mean gap between confidence and accuracy over the reliability bins, weighted by the
    share of answers in each (0: every confidence is as often right as it says)."""
    return float(sum(share * abs(conf - acc) for share, conf, acc in reliability_bins(probabilities, labels, bins)))


def brier_score(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Multi-class Brier score: mean over texts of the squared distance to the one-hot label (0 to 2)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels)]
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def quality(probabilities: np.ndarray, labels: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Every figure of the served answers ``probabilities`` (one row per answer, columns in the
    order of ``names``) against their true ``labels`` (indices into ``names``).

    A class no true label of the sample has has no recall and no F1, and a class never predicted
    has no precision: they are left out (absent, not 0). ``confusion[true][predicted]`` counts.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probabilities.ndim != 2 or len(probabilities) != len(labels) or probabilities.shape[1] != len(names):
        raise ValueError(f"need one row of {len(names)} probabilities per label, got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1) if len(labels) else labels
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    precision, recall, f1 = {}, {}, {}
    for k, name in enumerate(names):
        hits, truths, guesses = int(confusion[k, k]), int(confusion[k].sum()), int(confusion[:, k].sum())
        if guesses:
            precision[name] = hits / guesses
        if truths:
            recall[name] = hits / truths
            p = precision.get(name, 0.0)
            f1[name] = 2 * p * recall[name] / (p + recall[name]) if p + recall[name] else 0.0
    return {
        "labelled": len(labels),
        "accuracy": float((predicted == labels).mean()) if len(labels) else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_f1": float(np.mean(list(f1.values()))) if f1 else None,
        "confusion": {t: {p: int(confusion[i, j]) for j, p in enumerate(names)} for i, t in enumerate(names)},
        "ece": expected_calibration_error(probabilities, labels) if len(labels) else None,
        "brier": brier_score(probabilities, labels) if len(labels) else None,
    }
