"""What a training run leaves behind: the model directory with its provenance, the metrics and
plots the pipeline versions, and the same results in the W&B run."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from training.data import LABELS
from training.plots import plot_confusion_matrix, plot_training_curves
from training.runtime import describe_data, git_commit
from training.tracking import Tracker

log = logging.getLogger(__name__)

EPOCH_FIELDS = ["epoch", "accuracy", "macro_f1", "train_loss", "epoch_seconds"]


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """How the model was made: resolved config, git commit, data checksums, torch version."""
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git_commit(),
        "data_md5": describe_data([cfg.data.train_file, cfg.data.val_file]),
        "torch": torch.__version__,
        "max_length": cfg.train.max_length,
    }


def save_outputs(cfg: DictConfig, model, tokenizer, history: dict, metrics: dict, made_by: dict) -> None:
    """Model directory (safetensors, tokenizer, config, ``training_meta.json``), metrics JSON,
    per-epoch CSV and plots."""
    model_dir = Path(cfg.paths.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    # The tokenizer's model_max_length is the truncation length the handler reads.
    tokenizer.model_max_length = cfg.train.max_length
    tokenizer.save_pretrained(model_dir)
    (model_dir / "training_meta.json").write_text(json.dumps(made_by, indent=2) + "\n")

    metrics_dir = Path(cfg.paths.metrics_dir)
    (metrics_dir / "plots").mkdir(parents=True, exist_ok=True)
    (metrics_dir / "train.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (metrics_dir / "train_epochs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=EPOCH_FIELDS)
        writer.writeheader()
        writer.writerows(history["epochs"])
    plot_training_curves(history["steps"], history["epochs"], metrics_dir / "plots" / "training_curves.png")
    plot_confusion_matrix(metrics["confusion_matrix"], LABELS, metrics_dir / "plots" / "train_confusion_matrix.png")


def report_run(cfg: DictConfig, tracker: Tracker, metrics: dict, made_by: dict, train_seconds: float) -> None:
    """Final metrics, provenance, plots and (with ``logger.log_model``) the model directory in W&B."""
    tracker.summary(
        {
            "val/accuracy": metrics["accuracy"],
            "val/macro_f1": metrics["macro_f1"],
            "train_seconds": train_seconds,
            "git_commit": made_by["git_commit"],
            "data_md5": made_by["data_md5"],
        }
    )
    plots_dir = Path(cfg.paths.metrics_dir) / "plots"
    tracker.log_images(
        {
            "plots/training_curves": plots_dir / "training_curves.png",
            "plots/confusion_matrix": plots_dir / "train_confusion_matrix.png",
        }
    )
    if cfg.logger.log_model:
        tracker.log_files(
            "emotion-model",
            "model",
            Path(cfg.paths.model_dir),
            {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]},
        )
