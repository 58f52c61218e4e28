"""PNG plots the pipeline versions: training curves and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_training_curves(steps: Sequence[dict], epochs: Sequence[dict], path: Path) -> Path:
    """Loss and learning rate per step, validation accuracy and macro-F1 per epoch."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss", color="tab:blue")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_lr = ax_loss.twinx()
    ax_lr.plot([s["step"] for s in steps], [s["lr"] for s in steps], label="learning rate", color="tab:gray", alpha=0.6)
    ax_lr.set_ylabel("learning rate")
    ax_loss.set_title("Training loss")
    ax_val.plot([e["epoch"] for e in epochs], [e["accuracy"] for e in epochs], marker="o", label="accuracy")
    ax_val.plot([e["epoch"] for e in epochs], [e["macro_f1"] for e in epochs], marker="s", label="macro-F1")
    ax_val.set_xlabel("epoch")
    ax_val.set_title("Validation")
    ax_val.legend()
    ax_val.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix with raw counts in the cells."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    totals = [max(sum(row), 1) for row in confusion]
    normalised = [[c / totals[i] for c in row] for i, row in enumerate(confusion)]
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if normalised[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Validation confusion matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
