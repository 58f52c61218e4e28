"""Temperature scaling, calibration metrics and the risk-coverage table: the pipeline's calibrate stage.

``python -m training.calibrate experiment=<name>`` scores the validation split with the trained
model, fits one temperature ``T`` (the served probabilities become ``softmax(logits / T)``) and
writes:

* ``models/emotion-<name>.calibration.json`` (beside the model directory, like the drift profile):
  the temperature, which ``serving.archive`` packs and the handler applies;
* ``metrics/<name>/calibration.json``: expected calibration error (10 equal-width confidence bins),
  Brier score, negative log-likelihood and accuracy before and after scaling, on the whole
  validation split (where ``T`` was fitted) and held out (two-fold: ``T`` fitted on one half of the
  validation split, measured on the other, both ways; the test split is not distributed);
* ``metrics/<name>/risk_coverage.csv`` and ``plots/risk_coverage.png``: for each abstain threshold,
  the share of texts answered and the accuracy on them, so an operator can choose the handler's
  ``abstain_below``;
* ``plots/reliability.png``: the reliability diagram before and after.

Why one parameter fitted with PyTorch rather than a calibration library: temperature scaling is a
one-dimensional convex problem (the NLL in ``log T``), it keeps the ranking of the labels (so the
accuracy cannot change), the handler applies it with one division, and PyTorch is already here.
Vector or matrix scaling would need more validation texts than the 2,000 given to fit reliably.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from monitoring.quality import brier_score, expected_calibration_error, reliability_bins
from training.config import CONFIG_DIR

log = logging.getLogger(__name__)

THRESHOLDS = (*(round(0.05 * k, 2) for k in range(20)), 0.96, 0.97, 0.98, 0.99)


def fit_temperature(logits: np.ndarray, labels: Sequence[int]) -> float:
    """The temperature ``T > 0`` that minimises the negative log-likelihood of ``softmax(logits / T)``.

    Raises:
        ValueError: No logits, or labels that do not match them.
    """
    logits_t = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if logits_t.ndim != 2 or len(logits_t) == 0 or len(labels_t) != len(logits_t):
        raise ValueError(f"need one row of logits per label, got {tuple(logits_t.shape)} and {len(labels_t)} labels")
    if int(labels_t.min()) < 0 or int(labels_t.max()) >= logits_t.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits_t.shape[1]}), got {sorted(set(labels_t.tolist()))}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    # Perfectly separable logits push T towards 0; keep it in a range the handler can use.
    return float(min(max(temperature, 0.05), 20.0))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise probabilities of ``logits / temperature``."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def scores(probabilities: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    """ECE, Brier score, NLL and accuracy of ``probabilities``."""
    labels = np.asarray(labels)
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "brier": brier_score(probabilities, labels),
        "nll": float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()),
        "accuracy": float((probabilities.argmax(axis=1) == labels).mean()),
    }


def risk_coverage(
    probabilities: np.ndarray, labels: Sequence[int], thresholds: Sequence[float] = THRESHOLDS
) -> list[dict[str, float]]:
    """Per abstain threshold ``t`` (answer only when the top probability is at least ``t``): the
    share of texts answered, the accuracy on them (None when none is answered) and the errors
    among all texts."""
    confidence = np.asarray(probabilities).max(axis=1)
    correct = np.asarray(probabilities).argmax(axis=1) == np.asarray(labels)
    rows = []
    for t in thresholds:
        answered = confidence >= t
        rows.append(
            {
                "threshold": float(t),
                "coverage": float(answered.mean()),
                "accuracy": float(correct[answered].mean()) if answered.any() else None,
                "error_rate": float((answered & ~correct).mean()),
            }
        )
    return rows


def held_out(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, dict[str, float]]:
    """Scores before and after scaling on texts the temperature was not fitted on: two folds of a
    seeded shuffle, each scored with the temperature of the other, pooled."""
    order = np.random.default_rng(seed).permutation(len(labels))
    folds = (order[: len(order) // 2], order[len(order) // 2 :])
    after = np.zeros_like(logits, dtype=np.float64)
    temperatures = []
    for fit_on, score_on in (folds, folds[::-1]):
        temperature = fit_temperature(logits[fit_on], labels[fit_on])
        temperatures.append(temperature)
        after[score_on] = softmax(logits[score_on], temperature)
    return {
        "before": scores(softmax(logits), labels),
        "after": scores(after, labels),
        "fold_temperatures": [round(t, 4) for t in temperatures],
    }


def calibration_report(logits: np.ndarray, labels: Sequence[int]) -> dict:
    """The temperature and every figure the stage writes (see the module docstring)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "texts": len(labels),
        "validation": {
            "before": scores(softmax(logits), labels),
            "after": scores(softmax(logits, temperature), labels),
        },
        "held_out_two_fold": held_out(logits, labels),
        "risk_coverage": risk_coverage(softmax(logits, temperature), labels),
    }


def plot_reliability(logits: np.ndarray, labels: Sequence[int], temperature: float, path: Path) -> Path:
    """Reliability diagram: accuracy per confidence bin before and after scaling, and the diagonal."""
    from training.plots import plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for t, name, marker in ((1.0, "before", "o"), (temperature, f"after (T = {temperature:.2f})", "s")):
        probabilities = softmax(logits, t)
        points = reliability_bins(probabilities, labels)
        ece = expected_calibration_error(probabilities, labels)
        ax.plot([c for _, c, _ in points], [a for *_, a in points], marker=marker, label=f"{name}: ECE {ece:.4f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", title="Reliability on the validation split")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_risk_coverage(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy on the answered texts against coverage, one point per abstain threshold."""
    from training.plots import plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [r for r in rows if r["accuracy"] is not None]
    ax.plot([r["coverage"] for r in points], [r["accuracy"] for r in points], marker="o")
    for r in points:
        if r["threshold"] in (0.5, 0.7, 0.9, 0.95, 0.99):
            ax.annotate(
                f"{r['threshold']:g}", (r["coverage"], r["accuracy"]), textcoords="offset points", xytext=(4, 4)
            )
    ax.set(xlabel="coverage (share of texts answered)", ylabel="accuracy on answered texts")
    ax.set_title("Risk-coverage (labels: abstain_below)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_path(model_dir: Path) -> Path:
    """Where the temperature of the model in ``model_dir`` is written (beside the folder), for
    ``serving.archive`` to pack."""
    from serving.archive import CALIBRATION_SUFFIX, beside

    return beside(model_dir, CALIBRATION_SUFFIX)


def calibrate(cfg: DictConfig) -> dict:
    """The calibrate stage: score the validation split, fit, write the files listed above.

    Raises:
        FileNotFoundError: No trained model in ``paths.model_dir``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.batching import TokenizedSplit
    from training.data import load_split
    from training.evaluate import batch_logits
    from training.runtime import resolve_precision

    model_dir = Path(cfg.paths.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained model in {model_dir}: run the train stage first")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    split = TokenizedSplit(load_split(cfg.data.val_file, names), tokenizer, tokenizer.model_max_length)
    logits = np.zeros((len(split), len(names)))
    precision = resolve_precision(cfg.train.precision)
    for indices, batch in batch_logits(model, split, cfg.train.eval_batch_size, precision, desc="calibrate"):
        logits[indices] = batch.numpy()
    report = calibration_report(logits, split.labels)
    metrics_dir = Path(cfg.paths.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    rows = report.pop("risk_coverage")
    (metrics_dir / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    with (metrics_dir / "risk_coverage.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_reliability(logits, split.labels, report["temperature"], metrics_dir / "plots" / "reliability.png")
    plot_risk_coverage(rows, metrics_dir / "plots" / "risk_coverage.png")
    calibration_path(model_dir).write_text(
        json.dumps({"temperature": report["temperature"], "fitted_on": "validation", "texts": report["texts"]}) + "\n"
    )
    before, after = report["validation"]["before"], report["validation"]["after"]
    log.info(
        "temperature %.3f: ECE %.4f -> %.4f, Brier %.4f -> %.4f on %d validation texts",
        report["temperature"],
        before["ece"],
        after["ece"],
        before["brier"],
        after["brier"],
        report["texts"],
    )
    return report


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:  # pragma: no cover - thin CLI wrapper
    """CLI entry point: ``python -m training.calibrate``."""
    calibrate(cfg)


if __name__ == "__main__":
    main()
