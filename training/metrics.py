"""Classification metrics for the validation split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix.

    Macro-F1 averages over the labels that occur in the gold labels or the predictions (as
    scikit-learn's ``f1_score(average="macro")`` does): a label absent from both has no F1 to speak
    of, and counting it as 0 would lower the score of a split that lacks it. A label predicted but
    never gold counts, with F1 0. ``macro_f1_labels`` names the labels averaged over.

    A per-class figure that has nothing to be computed from is ``None`` (JSON ``null``), never a
    0.0 that reads as a class the model always gets wrong: precision of a label never predicted,
    recall of a label never gold, F1 of a label absent from both.

    Args:
        y_true: Gold label ids.
        y_pred: Predicted label ids.
        labels: Label names in id order.

    Returns:
        A JSON-serialisable dict. ``confusion_matrix[i][j]`` counts gold ``i`` predicted ``j``.
    """
    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    if true.shape != pred.shape or true.size == 0:
        raise ValueError(f"need equally long, non-empty label lists (got {true.size} and {pred.size})")
    n = len(labels)
    for name, ids in (("gold", true), ("predicted", pred)):
        if ids.min() < 0 or ids.max() >= n:
            raise ValueError(f"{name} label ids must lie in 0..{n - 1} (got {ids.min()}..{ids.max()})")
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0).astype(float)
    actual = confusion.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(n), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    present = (actual > 0) | (predicted > 0)
    return {
        "accuracy": float(tp.sum() / true.size),
        "macro_f1": float(f1[present].mean()),
        "macro_f1_labels": [name for i, name in enumerate(labels) if present[i]],
        "per_class_f1": {name: float(f1[i]) if present[i] else None for i, name in enumerate(labels)},
        "per_class_precision": {
            name: float(precision[i]) if predicted[i] > 0 else None for i, name in enumerate(labels)
        },
        "per_class_recall": {name: float(recall[i]) if actual[i] > 0 else None for i, name in enumerate(labels)},
        "confusion_matrix": confusion.tolist(),
        "labels": list(labels),
        "support": int(true.size),
    }
