"""``make drift``: the last logged requests of the running service against the reference profile.

``python -m monitoring.drift [--window 1000]`` reads the last ``window`` requests of the handler's
request log (``requests.jsonl`` and its rotated files), compares them with the reference profile's
validation sample using Evidently (PSI per column; a domain classifier on the texts when the log
holds them, the text statistics otherwise) and with the same PSI statistics the Prometheus drift
alerts use, writes ``report.html`` and ``summary.json`` under ``outputs/drift/``, prints a verdict
and exits

* 0: nothing drifted;
* 1: at least one column (or the texts) drifted;
* 2: too few logged requests to tell (fewer than ``drift_report.min_requests``, whatever the window);
* 3: no reference profile found, or the profile's labels are not those of the logged answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monitoring.drift_stats import DRIFT_CONFIG, alerts_firing, load_drift_config, stream_statistics
from monitoring.profile import load_profile, profile_path
from project import (
    ARCHIVE,
    OUTPUTS_DIR,
    SERVE_LOG_DIR,
    VAL_FILE,
    handler_module,
    pipeline_model_dir,
)
from training.data import read_labelled

monitor = handler_module("emotion_monitor")  # the module TorchServe's worker loads, not a second copy

log = logging.getLogger(__name__)

NUMERIC = ("chars", "tokens", "unknown_share", "unfamiliar_share")
# Confidence is compared on the handler's buckets, like the alerts: raw values would make the small,
# systematic difference between the profile's fp32 answers and the served int8 answers look like drift.
CATEGORICAL = ("confidence", "label", "truncated")
EXIT_OK, EXIT_DRIFT, EXIT_TOO_FEW, EXIT_NO_PROFILE = 0, 1, 2, 3
MIN_TEXTS = 2  # texts per side below which the domain classifier cannot be trained


class ProfileMismatch(ValueError):
    """The request log holds labels the reference profile does not know: it is another model's."""


def check_labels(entries: list[dict[str, Any]], profile: dict[str, Any]) -> None:
    """Raise :class:`ProfileMismatch` when the logged answers use labels outside the profile's
    label set (their ``label`` or the keys of their ``probabilities``)."""
    known = set(profile["labels"])
    logged = {e["label"] for e in entries}
    logged.update(name for e in entries if isinstance(e.get("probabilities"), dict) for name in e["probabilities"])
    unknown = sorted(logged - known)
    if unknown:
        raise ProfileMismatch(
            f"the request log holds labels the reference profile does not know ({', '.join(unknown)}; the profile "
            f"has {', '.join(profile['labels'])}): the profile belongs to another model than the one that answered"
        )


log_files = monitor.request_log_files


# The fields of a request-log entry the comparison reads, and the types each must have.
ENTRY_FIELDS: dict[str, tuple[type, ...]] = {
    "chars": (int,),
    "tokens": (int,),
    "unknown_share": (int, float),
    "confidence": (int, float),
    "label": (str,),
    "truncated": (bool,),
}
# Fields a handler older than the column did not log: an entry without one is still usable (one
# holding it with another type is not); the column is compared when the reference and every entry
# of the window hold it, and left out of the comparison (with a warning) otherwise.
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {"unfamiliar_share": (int, float)}


def usable_entry(entry: Any, fields: Mapping[str, tuple[type, ...]] | None = ENTRY_FIELDS) -> bool:
    """Whether ``entry`` is a JSON object holding every one of ``fields`` with its type (``bool``
    counts as no number: ``true`` is no token count); with ``fields`` None, any object."""
    if not isinstance(entry, dict):
        return False
    for name, types in (fields or {}).items():
        if not _typed(entry.get(name), types):
            return False
    return fields is None or all(_typed(entry[n], t) for n, t in OPTIONAL_FIELDS.items() if n in entry)


def _typed(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


def read_requests(
    log_dir: Path, window: int, fields: Mapping[str, tuple[type, ...]] | None = None
) -> list[dict[str, Any]]:
    """The last ``window`` entries of the request log. Lines that are no JSON object, or (with
    ``fields``, such as ``ENTRY_FIELDS``) lack one of those fields or its type, are skipped with a
    warning, so they neither fill the window nor break the comparison.

    Raises:
        ValueError: ``window`` is below 1.
    """
    if window < 1:
        raise ValueError(f"the drift window must be at least 1 request, not {window}")
    entries: list[dict[str, Any]] = []
    bad = 0
    for path in log_files(log_dir):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if usable_entry(entry, fields):
                entries.append(entry)
            else:
                bad += 1
    if bad:
        log.warning("skipped %d unreadable line(s) in %s", bad, log_dir)
    return entries[-window:]


def read_texts(path: Path) -> list[str]:
    """Texts of a ``text;label`` split file, stripped as the handler strips them."""
    return [text.strip() for text, _ in read_labelled(path)]


def _value_drift(snapshot) -> dict[str, dict[str, Any]]:
    """Per-column method, value and threshold from an Evidently snapshot."""
    results = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith("ValueDrift"):
            value = float(metric["value"]) if metric["value"] is not None else math.nan
            results[config["column"]] = {"method": config["method"], "value": value, "threshold": config["threshold"]}
    return results


def evidently_report(
    reference_rows: dict[str, list],
    entries: list[dict[str, Any]],
    reference_texts: list[str] | None,
    settings: dict[str, Any],
    out_dir: Path,
) -> dict[str, dict[str, Any]]:
    """Run Evidently's data-drift preset on the logged fields (``report.html``) and, when the log
    holds texts, on the texts (``text_report.html``); returns per-column method, value, threshold
    and whether it drifted.

    Columns use PSI (confidence on the handler's buckets): drift when it reaches ``psi_threshold``.
    Texts use Evidently's domain classifier
    (``abs_text_content_drift``: a TF-IDF classifier trained to tell reference from current texts):
    drift when its ROC AUC exceeds ``text_threshold``. Both text samples are cut to the same size
    first: the classifier's vectoriser drops words found in over half the texts, which on unequal
    samples would drop exactly the words that set the larger sample apart.
    """
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    missing = [
        c
        for c, types in OPTIONAL_FIELDS.items()
        if c not in reference_rows or not all(_typed(e.get(c), types) for e in entries)
    ]
    if missing:
        log.warning("not compared (absent from the reference profile or from some logged requests): %s", missing)
    numeric = [c for c in NUMERIC if c not in missing]
    columns = [*numeric, *CATEGORICAL]
    reference = pd.DataFrame({c: reference_rows[c] for c in columns})
    current = pd.DataFrame({c: [e[c] for e in entries] for c in columns})
    for frame in (reference, current):
        frame["truncated"] = frame["truncated"].astype(str)
        frame["confidence"] = [monitor.bucket_of(c, monitor.CONFIDENCE_BOUNDS) for c in frame["confidence"]]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=list(CATEGORICAL))
    threshold = settings["psi_threshold"]
    preset = DataDriftPreset(num_method="psi", cat_method="psi", num_threshold=threshold, cat_threshold=threshold)
    snapshot = Report([preset]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    snapshot.save_html(str(out_dir / "report.html"))
    results = _value_drift(snapshot)
    for result in results.values():
        result["drifted"] = bool(result["value"] >= result["threshold"])  # NaN (constant column) is no drift

    current_texts = [e.get("text") for e in entries]
    size = min(len(reference_texts or ()), len(current_texts))
    if reference_texts and all(isinstance(t, str) for t in current_texts) and size < MIN_TEXTS:
        # The domain classifier trains on one half of the texts and scores the other: on a single
        # text per side one half holds a single class, and the classifier cannot be fitted.
        log.warning("texts not compared: %d per side, the domain classifier needs %d", size, MIN_TEXTS)
    elif reference_texts and all(isinstance(t, str) for t in current_texts):
        ref_texts = pd.DataFrame({"text": reference_texts}).sample(size, random_state=0).reset_index(drop=True)
        cur_texts = pd.DataFrame({"text": current_texts}).sample(size, random_state=0).reset_index(drop=True)
        text_definition = DataDefinition(text_columns=["text"])
        text_preset = DataDriftPreset(text_method="abs_text_content_drift", text_threshold=settings["text_threshold"])
        snapshot = Report([text_preset]).run(
            Dataset.from_pandas(cur_texts, data_definition=text_definition),
            Dataset.from_pandas(ref_texts, data_definition=text_definition),
        )
        snapshot.save_html(str(out_dir / "text_report.html"))
        text = _value_drift(snapshot)["text"]
        text["drifted"] = bool(text["value"] > text["threshold"])
        results["text"] = text
    return results


def run_drift(
    log_dir: Path,
    profile: dict[str, Any],
    out_dir: Path,
    window: int,
    reference_texts: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Compare the last ``window`` logged requests with ``profile``; returns (exit code, summary).

    Fewer than ``drift_report.min_requests`` usable entries in the window are too few to tell,
    whatever the window (a verdict on a handful of requests would be noise).

    Raises:
        ValueError: ``window`` is below 1.
        ProfileMismatch: The log's labels are not the profile's.
    """
    config = config or load_drift_config()
    settings = config["drift_report"]
    entries = read_requests(log_dir, window, ENTRY_FIELDS)
    summary: dict[str, Any] = {"log_dir": str(log_dir), "window": window, "requests": len(entries)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    needed = settings["min_requests"]
    if len(entries) < needed:
        summary.update(verdict="too few requests", needed=needed)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return EXIT_TOO_FEW, summary
    check_labels(entries, profile)
    columns = evidently_report(profile["records"], entries, reference_texts, settings, out_dir)
    deciding = [*settings["columns"], *(["text"] if "text" in columns else [])]
    drifted = [c for c in deciding if columns.get(c, {}).get("drifted")]
    stats = stream_statistics(entries, profile)
    summary.update(
        verdict="drift" if drifted else "no drift",
        drifted_columns=drifted,
        columns=columns,
        texts_compared="text" in columns,
        statistics=stats,
        alert_conditions=alerts_firing(stats, config),
        report=str(out_dir / "report.html"),
    )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    return (EXIT_DRIFT if drifted else EXIT_OK), summary


def print_verdict(code: int, summary: dict[str, Any]) -> None:
    """One table of the columns and the verdict, on stdout."""
    if code == EXIT_TOO_FEW:
        print(
            f"too few requests: {summary['requests']} logged in {summary['log_dir']}, "
            f"{summary['needed']} needed; send traffic first"
        )
        return
    print(f"{summary['requests']} requests from {summary['log_dir']} against the reference profile:")
    for column, result in summary["columns"].items():
        flag = "DRIFT" if result["drifted"] else "ok"
        print(
            f"  {column:<14} {result['method']:<32} {result['value']:8.3f}  (threshold {result['threshold']:g})  {flag}"
        )
    stats = summary["statistics"]
    print(
        f"  alert statistics: label PSI {stats['label_psi']:.3f}, length PSI {stats['length_psi']:.3f}, "
        f"low-confidence share {stats['low_confidence_share']:.3f} (reference "
        f"{stats['reference_low_confidence_share']:.3f}), unknown-token share {stats['unknown_token_share']:.4f}"
    )
    verdict = f"DRIFT in {', '.join(summary['drifted_columns'])}" if code == EXIT_DRIFT else "no drift"
    print(f"verdict: {verdict}; report {summary['report']}")


def default_profile(model_dir: Path) -> Path:
    """The served archive's profile when it packs one, else the profile beside ``model_dir``."""
    archive = ARCHIVE
    try:
        load_profile(archive)
        return archive
    except FileNotFoundError:
        return profile_path(model_dir)


def positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1 (``--window``, ``$DRIFT_WINDOW``)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {value!r}")
    return number


def request_log_dir() -> Path:
    """Where ``make drift`` reads the request log: ``$LOG_LOCATION`` when set (as the handler
    writes it), else the TorchServe log folder of ``make serve`` (``project.SERVE_LOG_DIR``)."""
    return Path(os.environ["LOG_LOCATION"]) if os.environ.get("LOG_LOCATION") else SERVE_LOG_DIR


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of ``make drift``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--window", type=positive_int, default=os.environ.get("DRIFT_WINDOW") or None, help="default: $DRIFT_WINDOW"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="the request log's folder (default: $LOG_LOCATION, else that of `make serve`)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="profile JSON or archive (.mar)")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=pipeline_model_dir(),
        help="without --profile: the archive's profile, else this model's (<model-dir>.profile.json)",
    )
    parser.add_argument("--reference-texts", type=Path, default=VAL_FILE)
    parser.add_argument("--out-dir", type=Path, default=OUTPUTS_DIR / "drift")
    parser.add_argument("--config", type=Path, default=DRIFT_CONFIG)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = load_drift_config(args.config)
    window = args.window or config["drift_report"]["window"]
    try:
        profile = load_profile(args.profile or default_profile(args.model_dir))
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return EXIT_NO_PROFILE
    texts = read_texts(args.reference_texts) if args.reference_texts and args.reference_texts.is_file() else None
    log_dir = args.log_dir or request_log_dir()
    try:
        code, summary = run_drift(log_dir, profile, args.out_dir, window, texts, config)
    except ProfileMismatch as err:
        print(err, file=sys.stderr)
        return EXIT_NO_PROFILE
    print_verdict(code, summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
