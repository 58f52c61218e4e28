"""``make robustness``: validation accuracy of the served model under perturbations users produce,
and what each perturbation does to the drift statistics.

``python -m monitoring.robustness --archive model_store/emotion.mar`` unpacks the archive and runs
the handler on it in this process (``serving.worker``: a TorchServe worker context without the
server, batches of the archive's ``batchSize``) on the validation texts, once unchanged and once
per perturbation.
The handler's request log of each run is read back and compared with the archive's reference
profile by the same statistics the Prometheus drift alerts use. Writes
``outputs/robustness/robustness.json`` and prints Markdown tables: one row per perturbation, and the
spread of the drift statistics on undrifted streams (random validation halves), which the alert
thresholds in ``monitoring/drift.yaml`` must clear.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitoring.drift import positive_int, read_requests, run_drift
from monitoring.drift_stats import alerts_firing, load_drift_config, stream_statistics
from monitoring.profile import load_profile
from project import ARCHIVE, OUTPUTS_DIR, VAL_FILE, handler_module
from serving.worker import InProcessWorker
from training.data import load_split
from training.metrics import classification_metrics
from training.perturb import PERTURBATIONS, perturb

monitor = handler_module("emotion_monitor")  # the module TorchServe's worker loads, not a second copy


def reference_from(entries: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """A profile-like reference (the fields ``stream_statistics`` reads) built from logged answers."""
    tokens = [e["tokens"] for e in entries]
    n = max(len(entries), 1)
    return {
        "labels": list(labels),
        "low_confidence": monitor.LOW_CONFIDENCE,
        "validation": {
            "predicted_label_shares": {name: sum(e["label"] == name for e in entries) / n for name in labels},
            "token_histogram": {k: v / n for k, v in monitor.histogram(tokens, monitor.TOKEN_BOUNDS).items()},
            "confidence_histogram": {
                k: v / n
                for k, v in monitor.histogram([e["confidence"] for e in entries], monitor.CONFIDENCE_BOUNDS).items()
            },
            "low_confidence_share": sum(e["confidence"] <= monitor.LOW_CONFIDENCE for e in entries) / n,
            "unknown_token_share": sum(e["unknown_share"] * e["tokens"] for e in entries) / max(sum(tokens), 1),
            "unfamiliar_word_share": sum(e["unfamiliar_share"] * e["words"] for e in entries)
            / max(sum(e["words"] for e in entries), 1),
        },
    }


def noise(
    entries: Sequence[dict[str, Any]], labels: Sequence[str], sizes: Sequence[int] = (200, 1000), draws: int = 200
) -> list[dict[str, Any]]:
    """What the drift statistics read on streams that did not drift: the validation answers are
    split in random halves, one half is the reference and windows of ``size`` answers are drawn
    from the other; per window size, the 95th percentile and maximum of each statistic over
    ``draws`` splits."""
    rng = random.Random(0)
    keys = (
        "label_psi",
        "length_psi",
        "confidence_psi",
        "low_confidence_rise",
        "unknown_token_rise",
        "unfamiliar_word_rise",
    )
    rows = []
    for size in sizes:
        values: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(draws):
            shuffled = rng.sample(list(entries), len(entries))
            half = len(shuffled) // 2
            reference, other = reference_from(shuffled[:half], labels), shuffled[half:]
            stats = stream_statistics(rng.sample(other, min(size, len(other))), reference)
            stats["low_confidence_rise"] = stats["low_confidence_share"] - stats["reference_low_confidence_share"]
            stats["unknown_token_rise"] = stats["unknown_token_share"] - stats["reference_unknown_token_share"]
            stats["unfamiliar_word_rise"] = stats["unfamiliar_word_share"] - stats["reference_unfamiliar_word_share"]
            for k in keys:
                values[k].append(stats[k])
        row: dict[str, Any] = {"window": min(size, len(entries) - len(entries) // 2), "draws": draws}
        for k in keys:
            ordered = sorted(values[k])
            row[f"{k}_p95"] = ordered[int(0.95 * (len(ordered) - 1))]
            row[f"{k}_max"] = ordered[-1]
        rows.append(row)
    return rows


def evaluate(
    archive: Path, val_file: Path, limit: int | None = None, seed: int = 0, report_dir: Path | None = None
) -> dict[str, Any]:
    """Per perturbation: accuracy, its change and the drift statistics of that stream; and the
    statistics' spread on undrifted streams (``noise``). With ``report_dir``, each stream's request
    log is also run through ``make drift``'s comparison (Evidently), reports under ``report_dir``."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 text, not {limit}")
    config = load_drift_config()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log_root = Path(tmp) / "logs"
        # The archive's handler in this process, its request log under log_root.
        server = InProcessWorker.from_archive(archive, Path(tmp), request_log_dir=str(log_root))
        profile = load_profile(server.model_dir / "reference_profile.json")
        examples = load_split(val_file, profile["labels"])[:limit]
        gold = [profile["labels"][e.label] for e in examples]
        for name in PERTURBATIONS:
            log_dir = log_root / name.replace(" ", "_")
            old = server.handler.monitor.request_log
            server.handler.monitor.request_log = monitor.RequestLog(
                log_dir / monitor.REQUEST_LOG_NAME, old.max_bytes, old.backups
            )
            answers = server.predict(perturb([e.text for e in examples], name, seed))
            accuracy = sum(a.get("label") == g for a, g in zip(answers, gold, strict=True)) / len(gold)
            entries = read_requests(log_dir, len(examples))
            stats = stream_statistics(entries, profile)
            rows.append(
                {
                    "perturbation": name,
                    "accuracy": accuracy,
                    "macro_f1": macro_f1(answers, examples, profile["labels"]),
                    **stats,
                    "alerts": alerts_firing(stats, config),
                }
            )
            if report_dir is not None:
                code, summary = run_drift(log_dir, profile, report_dir / log_dir.name, len(examples), None, config)
                rows[-1].update(make_drift_exit=code, drifted_columns=summary.get("drifted_columns", []))
            if name == "none":
                undrifted = noise(entries, profile["labels"])
    base = rows[0]["accuracy"]
    for row in rows:
        row["accuracy_change_points"] = 100 * (row["accuracy"] - base)
    return {"model": profile.get("model_dir"), "texts": len(examples), "perturbations": rows, "noise": undrifted}


def noise_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table of the statistics on undrifted streams (docs/drift.md)."""
    lines = [
        "| window | label PSI p95 / max | length PSI p95 / max | confidence PSI p95 / max "
        "| low-confidence rise p95 / max | unknown-token rise p95 / max | unfamiliar-word rise p95 / max |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [
            f"{r[k + '_p95']:.3f} / {r[k + '_max']:.3f}"
            for k in (
                "label_psi",
                "length_psi",
                "confidence_psi",
                "low_confidence_rise",
                "unknown_token_rise",
                "unfamiliar_word_rise",
            )
        ]
        lines.append(f"| {r['window']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def macro_f1(answers: Sequence[dict[str, Any]], examples: Sequence[Any], labels: Sequence[str]) -> float | None:
    """Macro-F1 of the served answers (as the evaluate stage computes it); None when an answer
    has no label (an abstention or an error)."""
    if any(a.get("label") not in labels for a in answers):
        return None
    predicted = [labels.index(a["label"]) for a in answers]
    return classification_metrics([e.label for e in examples], predicted, labels)["macro_f1"]


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The robustness table (docs/drift.md)."""
    lines = [
        "| perturbation | accuracy | macro-F1 | change (points) | label PSI | length PSI | confidence PSI "
        "| low-confidence share | unknown-token share | unfamiliar-word share | drift alerts |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with_reports = all("make_drift_exit" in r for r in rows)
    if with_reports:
        lines[0] += " make drift (drifted columns) |"
        lines[1] += " --- |"
    for r in rows:
        line = (
            f"| {r['perturbation']} | {100 * r['accuracy']:.2f}% | {_f1(r.get('macro_f1'))} "
            f"| {r['accuracy_change_points']:+.2f} "
            f"| {r['label_psi']:.3f} | {r['length_psi']:.3f} | {r['confidence_psi']:.3f} "
            f"| {r['low_confidence_share']:.3f} | {r['unknown_token_share']:.4f} | {r['unfamiliar_word_share']:.3f} "
            f"| {', '.join(r['alerts']) or '-'} |"
        )
        if with_reports:
            line += f" {r['make_drift_exit']} ({', '.join(r['drifted_columns']) or '-'}) |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of ``make robustness``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--val-file", type=Path, default=VAL_FILE)
    parser.add_argument("--limit", type=positive_int, default=None, help="first N validation texts only")
    parser.add_argument("--out", type=Path, default=OUTPUTS_DIR / "robustness" / "robustness.json")
    parser.add_argument("--no-drift-report", action="store_true", help="skip the Evidently report per stream")
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        print(f"archive not found: {args.archive} (make archive)", file=sys.stderr)
        return 1
    reports = None if args.no_drift_report else args.out.parent / "drift"
    result = evaluate(args.archive, args.val_file, args.limit, report_dir=reports)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['texts']} validation texts, model {result['model']}\n")
    print(markdown_table(result["perturbations"]))
    print(f"\nUndrifted streams ({result['noise'][0]['draws']} random validation halves per window size):\n")
    print(noise_table(result["noise"]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
