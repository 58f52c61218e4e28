"""``make quality``: the feedback loop end to end, checked against the offline evaluation.

Replays a labelled file (default: the validation split) through the front door of ``make serve``
as a client would: each text is predicted, its answer's ``request_id`` kept, then the true labels
are sent through ``POST /feedback``. It then reads the live quality the gateway's metrics report
(``serving.feedback``) and evaluates the same archive offline, in process, on the texts the live
window covers, and prints both side by side. Exit code 0 when the accuracies agree within
``--tolerance`` points (default 0.1), 1 when they do not (or when labels from before this run
share the live window, so that nothing can be compared), 2 when no service runs.

``python -m monitoring.live_quality [--file data/processed/val.txt] [--limit N] [--concurrency 4]``
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from loadtest.settings import inference_key
from monitoring.quality import quality
from project import ARCHIVE, GATEWAY_METRICS_PORT, GATEWAY_URL, LOOPBACK, VAL_FILE
from serving.emotion_client import EmotionClient
from training.data import read_labelled

FEEDBACK_BATCH = 500  # items per POST /feedback (the route takes up to 1,000)
EXIT_AGREE, EXIT_DISAGREE, EXIT_NO_SERVICE = 0, 1, 2


def live_metrics(url: str) -> dict[str, dict[tuple, float]]:
    """The gateway's ``emotion_quality_*`` and ``emotion_feedback_*`` samples: name -> (sorted
    labels) -> value."""
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for s in family.samples:
            if s.name.startswith(("emotion_quality_", "emotion_feedback_")):
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def accepted(samples: dict[str, dict[tuple, float]]) -> float:
    """Labels the feedback service has accepted since it started (its counter; 0 before any)."""
    return samples.get("emotion_feedback_items_total", {}).get((("result", "accepted"),), 0.0)


def predict_all(client: EmotionClient, texts: Sequence[str], concurrency: int, run: str) -> list[dict]:
    """Each text's answer through the gateway, one request a text as a live client sends them
    (``request_id`` ``<run>-<index>``), with a progress bar."""

    def one(i: int) -> dict:
        return dataclasses.asdict(client.predict(texts[i], request_id=f"{run}-{i}"))

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(one, range(len(texts))), total=len(texts), desc="predict", unit="text"))


def send_feedback(client: EmotionClient, ids: Sequence[str], labels: Sequence[str]) -> dict[str, int]:
    """The true labels through ``POST /feedback``, in batches; the outcomes counted."""
    counts: dict[str, int] = {}
    for start in tqdm(range(0, len(ids), FEEDBACK_BATCH), desc="feedback", unit="batch"):
        chunk = slice(start, start + FEEDBACK_BATCH)
        items = [{"request_id": r, "label": y} for r, y in zip(ids[chunk], labels[chunk], strict=True)]
        for result, n in client.feedback_list(items)["counts"].items():
            counts[result] = counts.get(result, 0) + n
    return counts


def offline(archive: Path, texts: Sequence[str], labels: Sequence[str]) -> dict:
    """``monitoring.quality`` of the archive's own engine, in process, on ``texts``."""
    from serving.worker import InProcessWorker

    with tempfile.TemporaryDirectory() as tmp:
        worker = InProcessWorker.from_archive(archive, Path(tmp), request_log=False)
        answers = worker.predict(list(texts))
    names = list(answers[0]["probabilities"])
    probabilities = np.array([[a["probabilities"][n] for n in names] for a in answers])
    return quality(probabilities, [names.index(y) for y in labels], names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=VAL_FILE, help="labelled texts (text;label lines)")
    parser.add_argument("--limit", type=int, default=None, help="replay the first N texts only")
    parser.add_argument("--url", default=GATEWAY_URL)
    parser.add_argument("--metrics-url", default=f"http://{LOOPBACK}:{GATEWAY_METRICS_PORT}/metrics")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="the archive `make serve` serves")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.1, help="points of accuracy")
    args = parser.parse_args(argv)
    rows = read_labelled(args.file)[: args.limit]
    texts, labels = [t for t, _ in rows], [y for _, y in rows]
    client = EmotionClient(args.url, key=inference_key())
    try:
        before = live_metrics(args.metrics_url)
    except requests.ConnectionError:
        print(f"no service at {args.metrics_url}: start it with `make serve`", file=sys.stderr)
        return EXIT_NO_SERVICE
    run = f"quality-{uuid.uuid4().hex[:8]}"
    with client:
        answers = predict_all(client, texts, args.concurrency, run)
        counts = send_feedback(client, [a["request_id"] for a in answers], labels)
    window = int(next(iter(before.get("emotion_quality_window", {}).values()), 1000))
    covered = min(window, len(texts))
    # The live window holds the last labels sent: this run's last `covered` texts, once the
    # metrics count this run's accepted labels (they are refreshed about once a second).
    accepted_before = accepted(before)
    deadline = time.monotonic() + 30
    while True:
        live = live_metrics(args.metrics_url)
        versions = live.get("emotion_quality_labelled", {})
        now = accepted(live)
        caught_up = now - (accepted_before if now >= accepted_before else 0) >= counts.get("accepted", 0)
        if caught_up:
            break
        if time.monotonic() > deadline:
            print("the gateway's metrics never counted this run's labels: is the feedback service up?", file=sys.stderr)
            return EXIT_DISAGREE
        time.sleep(0.5)
    if not versions:
        print("the gateway reports no live quality: is the feedback service running?", file=sys.stderr)
        return EXIT_DISAGREE
    version = max(versions, key=versions.get)
    if versions[version] > covered:
        # Labels sent before this run share the window: the live figures are not this file's.
        print(
            f"cannot compare: the live window holds {versions[version]:.0f} labels, {covered} of them this "
            f"run's; replay at least {window} texts (--limit) or a fresh service",
            file=sys.stderr,
        )
        return EXIT_DISAGREE
    reference = offline(args.archive, texts[-covered:], labels[-covered:])
    live_accuracy = live["emotion_quality_accuracy"][version]
    print(f"feedback outcomes: {counts}")
    print(f"{'':22} {'live (/metrics)':>16} {'offline (archive)':>18}")
    print(f"{'labelled in window':22} {versions[version]:>16.0f} {reference['labelled']:>18}")
    print(f"{'accuracy':22} {live_accuracy:>16.4f} {reference['accuracy']:>18.4f}")
    for name in ("macro_f1", "ece", "brier"):
        value = live.get(f"emotion_quality_{name}", {}).get(version, float("nan"))
        print(f"{name:22} {value:>16.4f} {reference[name]:>18.4f}")
    gap = round(100 * abs(live_accuracy - reference["accuracy"]), 9)  # one text in 1,000 is 0.1, not 0.1000001
    verdict = "agree" if gap <= args.tolerance else "DISAGREE"
    print(f"accuracy gap {gap:.3f} points (tolerance {args.tolerance}): {verdict} ({dict(version)})")
    return EXIT_AGREE if gap <= args.tolerance else EXIT_DISAGREE


if __name__ == "__main__":
    sys.exit(main())
