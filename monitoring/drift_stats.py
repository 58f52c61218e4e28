"""Drift statistics of a stream of requests against the reference profile, computed like the
Prometheus drift rules compute them (same buckets, same PSI with the same floor), so that offline
measurements (``make robustness``, threshold choice) and the live alerts agree."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from project import handler_module

monitor = handler_module("emotion_monitor")  # the module TorchServe's worker loads, not a second copy


MONITORING_DIR = Path(__file__).resolve().parent
DRIFT_CONFIG = MONITORING_DIR / "drift.yaml"


def load_drift_config(path: Path = DRIFT_CONFIG) -> dict[str, Any]:
    """The drift settings (``monitoring/drift.yaml``)."""
    return yaml.safe_load(Path(path).read_text())


def psi(live: Mapping[str, float], reference: Mapping[str, float], floor: float = 0.001) -> float:
    """Population stability index sum((p - q) * ln(p / q)) over the reference's buckets.

    ``live`` may hold counts or shares (it is normalised); both sides are clamped to at least
    ``floor`` so that an empty bucket contributes a large but finite term (as in the rules).
    """
    total = sum(live.values())
    if total <= 0:
        return math.nan
    value = 0.0
    for bucket, ref in reference.items():
        p = max(live.get(bucket, 0) / total, floor)
        q = max(ref, floor)
        value += (p - q) * math.log(p / q)
    return value


def stream_statistics(entries: Sequence[Mapping[str, Any]], profile: Mapping[str, Any]) -> dict[str, float]:
    """The statistics the drift alerts watch, for request-log entries against ``profile``.

    Returns:
        ``requests``, ``label_psi``, ``length_psi``, ``confidence_psi``, ``low_confidence_share``
        (and its reference), ``unknown_token_share`` (and its reference), ``unfamiliar_word_share``
        (and its reference; entries of logs written before it existed count no words), ``truncated_share``,
        ``mean_tokens``.
    """
    val = profile["validation"]
    floor = 0.001
    tokens = [e["tokens"] for e in entries]
    confidences = [e["confidence"] for e in entries]
    # Every answer counts in the shares' total, as in the rules (a label's rate over the sum of all
    # labels' rates): answers with a label the profile lacks lower the profile's labels' shares.
    label_counts = Counter(e["label"] for e in entries)
    unknown = sum(e["unknown_share"] * e["tokens"] for e in entries)
    words = sum(e.get("words", 0) for e in entries)
    unfamiliar = sum(e.get("unfamiliar_share", 0.0) * e.get("words", 0) for e in entries)
    low = profile["low_confidence"]
    return {
        "requests": len(entries),
        "label_psi": psi(label_counts, val["predicted_label_shares"], floor),
        "length_psi": psi(monitor.histogram(tokens, monitor.TOKEN_BOUNDS), val["token_histogram"], floor),
        "confidence_psi": psi(
            monitor.histogram(confidences, monitor.CONFIDENCE_BOUNDS), val["confidence_histogram"], floor
        ),
        "low_confidence_share": sum(c <= low for c in confidences) / max(len(entries), 1),
        "reference_low_confidence_share": val["low_confidence_share"],
        "unknown_token_share": unknown / max(sum(tokens), 1),
        "reference_unknown_token_share": val["unknown_token_share"],
        "unfamiliar_word_share": unfamiliar / max(words, 1),
        "reference_unfamiliar_word_share": val.get("unfamiliar_word_share", 0.0),
        "truncated_share": sum(bool(e["truncated"]) for e in entries) / max(len(entries), 1),
        "mean_tokens": sum(tokens) / max(len(entries), 1),
    }


def alerts_firing(stats: Mapping[str, float], config: Mapping[str, Any]) -> list[str]:
    """Names of the Prometheus drift alerts whose condition ``stats`` meet (ignoring ``for``)."""
    prom = config["prometheus"]
    if stats["requests"] < prom["min_requests"]:
        return []
    firing = []
    if stats["label_psi"] > prom["label_psi"]:
        firing.append("EmotionLabelShift")
    if stats["length_psi"] > prom["length_psi"]:
        firing.append("EmotionInputLengthShift")
    if stats["low_confidence_share"] > stats["reference_low_confidence_share"] + prom["low_confidence_rise"]:
        firing.append("EmotionLowConfidenceRise")
    if stats["unknown_token_share"] > stats["reference_unknown_token_share"] + prom["unknown_token_rise"]:
        firing.append("EmotionUnknownTokensRise")
    if stats["unfamiliar_word_share"] > stats["reference_unfamiliar_word_share"] + prom["unfamiliar_word_rise"]:
        firing.append("EmotionUnfamiliarWordsRise")
    return firing
