"""Batched prediction and the pipeline's evaluate stage.

``python -m training.evaluate`` loads the saved model directory, predicts the
validation split and writes ``metrics/eval.json`` plus the confusion-matrix plot; ``robustness``
in it holds accuracy and macro-F1 under each seeded perturbation of :mod:`training.perturb`.
Where the words stage wrote the training split's word list beside the model directory,
``typo_correction`` holds the same figures with the texts read as the handler reads them: each
word one typo away from a known word corrected first (``handler/emotion_spelling.py``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from project import handler_module
from training.batching import TokenizedSplit, bucketed_batches
from training.config import CONFIG_DIR
from training.data import Example, load_split
from training.metrics import classification_metrics
from training.perturb import ROBUSTNESS, metric_key, perturb
from training.plots import plot_confusion_matrix
from training.runtime import resolve_precision

log = logging.getLogger(__name__)


def batch_logits(
    model,
    split: TokenizedSplit,
    batch_size: int,
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "evaluate",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """The model's fp32 logits over ``split`` in length-sorted batches: ``(indices, logits)`` pairs."""
    model.eval()
    batches = bucketed_batches(split.lengths(), batch_size, seed=0, epoch=0, shuffle=False)
    with torch.inference_mode():
        for indices in tqdm(batches, desc=desc, leave=False, disable=not progress):
            batch = split.collate(indices)
            batch.pop("labels")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(**batch).logits
            yield indices, logits.float()


def predict(model, split: TokenizedSplit, batch_size: int, precision: str = "fp32", progress: bool = True) -> list[int]:
    """Predicted label ids for every example of ``split``, in split order."""
    predictions = [0] * len(split)
    for indices, logits in batch_logits(model, split, batch_size, precision, progress):
        for i, label in zip(indices, logits.argmax(dim=-1).tolist(), strict=True):
            predictions[i] = label
    return predictions


def robustness(
    model,
    examples: Sequence[Example],
    tokenizer,
    batch_size: int,
    precision: str = "fp32",
    read: Callable[[list[str]], list[str]] | None = None,
) -> dict:
    """Accuracy and macro-F1 on ``examples`` under each perturbation of
    :data:`training.perturb.ROBUSTNESS` (seeded), keyed as the DVC metrics name them; ``read``
    turns the perturbed texts into what the model reads (the handler's typo correction)."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    gold = [e.label for e in examples]
    out = {}
    for name in ROBUSTNESS:
        texts = perturb([e.text for e in examples], name)
        texts = read(texts) if read else texts
        split = TokenizedSplit(
            [Example(t, e.label) for t, e in zip(texts, examples, strict=True)], tokenizer, tokenizer.model_max_length
        )
        predictions = predict(model, split, batch_size, resolve_precision(precision), progress=False)
        scores = classification_metrics(gold, predictions, labels)
        out[metric_key(name)] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Evaluate the model directory on the validation split and write metrics and plot.

    Returns:
        The metrics dict written to ``<metrics_dir>/eval.json``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(cfg.paths.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no trained model in {model_dir}: run the train stage first")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    examples = load_split(cfg.data.val_file, labels)
    split = TokenizedSplit(examples, tokenizer, tokenizer.model_max_length)
    start = time.perf_counter()
    predictions = predict(model, split, cfg.train.eval_batch_size, resolve_precision(cfg.train.precision))
    metrics = classification_metrics(split.labels, predictions, labels)
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    metrics["robustness"] = robustness(model, examples, tokenizer, cfg.train.eval_batch_size, cfg.train.precision)
    speller = load_speller(model_dir, tokenizer)
    if speller is not None:
        metrics["typo_correction"] = corrected_metrics(model, examples, tokenizer, cfg, speller)
    metrics_dir = Path(cfg.paths.metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    (metrics_dir / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(metrics["confusion_matrix"], labels, metrics_dir / "plots" / "confusion_matrix.png")
    log.info("validation accuracy %.4f, macro-F1 %.4f", metrics["accuracy"], metrics["macro_f1"])
    for name, row in metrics["robustness"].items():
        log.info("  %-22s accuracy %.4f, macro-F1 %.4f", name, row["accuracy"], row["macro_f1"])
    for name, row in metrics.get("typo_correction", {}).get("robustness", {}).items():
        log.info("  corrected %-12s accuracy %.4f, macro-F1 %.4f", name, row["accuracy"], row["macro_f1"])
    return metrics


def load_speller(model_dir: Path, tokenizer):
    """The handler's typo correction for ``model_dir``: the words stage's list beside it and the
    tokenizer's whole words; None when the words stage has not run."""
    from serving.archive import WORDS_SUFFIX, beside

    words = beside(model_dir, WORDS_SUFFIX)
    if not words.is_file():
        return None
    spelling, monitor = handler_module("emotion_spelling"), handler_module("emotion_monitor")
    return spelling.Speller(spelling.read_words(words), monitor.known_words(tokenizer.get_vocab()))


def corrected_metrics(model, examples: Sequence[Example], tokenizer, cfg: DictConfig, speller) -> dict:
    """Accuracy, macro-F1 and robustness with the texts read through ``speller``, as served."""
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    read = [Example(t, e.label) for t, e in zip(speller.correct_all([e.text for e in examples]), examples, strict=True)]
    split = TokenizedSplit(read, tokenizer, tokenizer.model_max_length)
    precision = resolve_precision(cfg.train.precision)
    scores = classification_metrics(split.labels, predict(model, split, cfg.train.eval_batch_size, precision), labels)
    return {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "texts_changed": sum(a.text != b.text for a, b in zip(read, examples, strict=True)),
        "robustness": robustness(
            model, examples, tokenizer, cfg.train.eval_batch_size, cfg.train.precision, speller.correct_all
        ),
    }


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:  # pragma: no cover - thin CLI wrapper
    """CLI entry point: ``python -m training.evaluate``."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
