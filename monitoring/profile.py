"""The reference profile: what the model's inputs and answers look like on the data it was built on.

``python -m monitoring.profile --model-dir models/emotion-default`` writes ``models/emotion-default.profile.json``
beside the model directory (the DVC ``profile`` stage); ``serving.archive`` packs it into the
archive as ``reference_profile.json``, and the drift rules (``monitoring.drift_rules``), ``make
drift`` and ``make robustness`` compare live traffic with it. It holds

* the training split's label shares, token-length quantiles and histogram, unknown-token share
  and share of texts that fill the token window;
* the same for the validation split, plus the model's answers on it: predicted-label shares,
  the prediction-confidence histogram, the low-confidence share and accuracy;
* one row of request-log fields per validation text (``records``): the reference sample Evidently
  compares logged requests with.

Histograms use the handler's buckets (``handler/emotion_monitor.py``), so live and reference
distributions are always on the same buckets. Texts are tokenised by the handler's own tokenizer
(``handler/emotion_engine.py``'s ``load_tokenizer``), truncated at its ``model_max_length`` and
flagged ``truncated`` as the handler flags them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from project import TRAIN_FILE, VAL_FILE, handler_module, pipeline_model_dir
from serving.archive import ARCHIVE_PROFILE_NAME, CALIBRATION_SUFFIX, PROFILE_SUFFIX, beside
from training.data import load_split

monitor = handler_module("emotion_monitor")  # the module TorchServe's worker loads, not a second copy

log = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def profile_path(model_dir: Path) -> Path:
    """Where the profile of ``model_dir`` lives: beside it, ``<model_dir>.profile.json``."""
    model_dir = Path(model_dir)
    return beside(model_dir, PROFILE_SUFFIX)


def shares(counts: dict[str, int]) -> dict[str, float]:
    """Counts turned into shares of their total (all zeros when empty)."""
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    """The ``QUANTILES`` of ``values`` as ``{"p50": ...}``."""
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def input_statistics(tokenizer, texts: Sequence[str], max_length: int, labels: Sequence[str]) -> dict:
    """Token-length histogram and quantiles, unknown-token and truncated shares of ``texts``
    (``tokenizer``: the handler's, from ``load_tokenizer``)."""
    token_ids, cut = tokenizer.encode(list(texts), max_length)
    uniform = [[1.0 / len(labels)] * len(labels)] * len(texts)  # probabilities are not needed here
    known = monitor.known_words(tokenizer.get_vocab())
    records = monitor.make_records(texts, token_ids, uniform, labels, tokenizer.unk_token_id, cut, known)
    tokens = [r.tokens for r in records]
    return {
        "examples": len(texts),
        "token_quantiles": quantiles(tokens),
        "token_mean": float(np.mean(tokens)),
        "token_histogram": shares(monitor.histogram(tokens, monitor.TOKEN_BOUNDS)),
        "chars_quantiles": quantiles([r.chars for r in records]),
        "unknown_token_share": sum(r.unknown_tokens for r in records) / max(sum(tokens), 1),
        "unfamiliar_word_share": sum(r.unfamiliar_words for r in records) / max(sum(r.words for r in records), 1),
        "truncated_share": sum(r.truncated for r in records) / max(len(records), 1),
    }


@torch.inference_mode()
def predict_probabilities(
    model, token_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int, temperature: float = 1.0
) -> np.ndarray:
    """Softmax probabilities of ``logits / temperature`` for each token sequence, run in batches
    of similar length."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out = np.zeros((len(token_ids), model.config.num_labels), dtype=np.float64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = max(len(token_ids[i]) for i in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(token_ids[i])] = torch.tensor(token_ids[i])
            mask[r, : len(token_ids[i])] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        out[rows] = torch.softmax(logits / temperature, dim=-1).numpy()
    return out


def build_profile(model_dir: Path, train_file: Path, val_file: Path, batch_size: int = 64) -> dict:
    """The reference profile of the model in ``model_dir`` on the given training and validation
    splits, with the probabilities as the archive serves them: at the temperature written beside
    the model directory (``training.calibrate``), if any."""
    from transformers import AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    temperature = handler_module("emotion_engine").read_temperature(beside(model_dir, CALIBRATION_SUFFIX))
    tokenizer = handler_module("emotion_engine").load_tokenizer(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = tokenizer.model_max_length
    train = load_split(train_file, labels)
    val = load_split(val_file, labels)

    train_stats = input_statistics(tokenizer, [e.text for e in train], max_length, labels)
    train_counts = Counter(labels[e.label] for e in train)
    train_stats["label_shares"] = shares({name: train_counts[name] for name in labels})

    texts = [e.text for e in val]
    token_ids, cut = tokenizer.encode(texts, max_length)
    log.info("scoring %d validation texts", len(texts))
    probabilities = predict_probabilities(model, token_ids, tokenizer.pad_token_id or 0, batch_size, temperature)
    known = monitor.known_words(tokenizer.get_vocab())
    records = monitor.make_records(texts, token_ids, probabilities.tolist(), labels, tokenizer.unk_token_id, cut, known)
    confidences = [r.confidence for r in records]
    val_stats = input_statistics(tokenizer, texts, max_length, labels)
    val_stats.update(
        label_shares=shares({name: sum(1 for e in val if labels[e.label] == name) for name in labels}),
        predicted_label_shares=shares({name: sum(1 for r in records if r.label == name) for name in labels}),
        confidence_histogram=shares(monitor.histogram(confidences, monitor.CONFIDENCE_BOUNDS)),
        confidence_quantiles=quantiles(confidences),
        low_confidence_share=sum(c <= monitor.LOW_CONFIDENCE for c in confidences) / len(confidences),
        accuracy=sum(r.label == labels[e.label] for r, e in zip(records, val, strict=True)) / len(val),
    )
    # The request log's fields for each validation text (no time, no text): Evidently's reference.
    rows = [monitor.log_entry(r, labels, 0.0, with_text=False) for r in records]
    columns = ("chars", "tokens", "unknown_share", "unfamiliar_share", "truncated", "label", "confidence")
    return {
        "model_dir": str(model_dir),
        "labels": labels,
        "max_length": max_length,
        "low_confidence": monitor.LOW_CONFIDENCE,
        "temperature": temperature,
        "buckets": {
            "confidence": {
                "bounds": list(monitor.CONFIDENCE_BOUNDS),
                "names": monitor.bucket_names(monitor.CONFIDENCE_BOUNDS),
            },
            "tokens": {"bounds": list(monitor.TOKEN_BOUNDS), "names": monitor.bucket_names(monitor.TOKEN_BOUNDS)},
        },
        "train": train_stats,
        "validation": val_stats,
        "records": {name: [row[name] for row in rows] for name in columns},
    }


def load_profile(path: Path) -> dict:
    """Read a profile from its JSON file, or from a model archive (``.mar``) that packs one.

    Raises:
        FileNotFoundError: No profile at ``path`` (or none inside the archive).
    """
    import zipfile

    path = Path(path)
    if path.suffix == ".mar":
        if not path.is_file():
            raise FileNotFoundError(f"archive not found: {path} (make archive)")
        with zipfile.ZipFile(path) as archive:
            if ARCHIVE_PROFILE_NAME not in archive.namelist():
                raise FileNotFoundError(
                    f"{path} packs no {ARCHIVE_PROFILE_NAME}: write the profile (python -m monitoring.profile) "
                    "and rebuild the archive"
                )
            return json.loads(archive.read(ARCHIVE_PROFILE_NAME))
    if not path.is_file():
        raise FileNotFoundError(f"reference profile not found: {path} (python -m monitoring.profile --model-dir ...)")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    """CLI: write the profile of a model directory beside it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=pipeline_model_dir())
    parser.add_argument("--train-file", type=Path, default=TRAIN_FILE)
    parser.add_argument("--val-file", type=Path, default=VAL_FILE)
    parser.add_argument("--out", type=Path, help="default: <model-dir>.profile.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = build_profile(args.model_dir, args.train_file, args.val_file)
    out = args.out or profile_path(args.model_dir)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    val = profile["validation"]
    print(
        f"wrote {out}: validation accuracy {val['accuracy']:.4f}, low-confidence share "
        f"{val['low_confidence_share']:.3f}, median tokens {val['token_quantiles']['p50']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
