"""Long texts, truncated or chunked: what the second half of a text changes in its answer.

``python -m bench.long_texts --archive model_store/emotion.mar`` builds texts of two halves from the
validation split: the first half is several texts of one label (longer than the model's window on
its own), the second half as many texts of another label. It answers each with the archive's
handler in this process, once as shipped (``long_texts: truncate``) and once with
``long_texts: chunk``, and reports how often the answer is the first half's label, the second
half's, and the mean probability of the second half's label, with the seconds per text of each.
Writes ``bench/results/long_texts.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from project import ARCHIVE, LABELS, PROJECT_ROOT, VAL_FILE
from serving.settings import max_text_chars
from serving.worker import InProcessWorker
from training.data import load_split


def two_halves(
    val_file: Path, count: int, texts_per_half: int, seed: int, max_chars: int
) -> list[tuple[str, str, str]]:
    """``count`` texts ``(text, first label, second label)``: ``texts_per_half`` validation texts of
    one label, then as many of another, the labels and texts drawn with ``seed``; a draw longer
    than ``max_chars`` (the handler's limit) is drawn again."""
    by_label = defaultdict(list)
    for example in load_split(val_file):
        by_label[LABELS[example.label]].append(example.text)
    rng = random.Random(seed)
    labels = [label for label in LABELS if len(by_label[label]) >= texts_per_half]
    made = []
    while len(made) < count:
        first, second = rng.sample(labels, 2)
        halves = [" . ".join(rng.sample(by_label[label], texts_per_half)) for label in (first, second)]
        if len(text := " . ".join(halves)) <= max_chars:
            made.append((text, first, second))
    return made


def measure(worker: InProcessWorker, texts: list[tuple[str, str, str]]) -> dict:
    """How the answers of ``texts`` fall: first half's label, second half's, its probability."""
    started = time.perf_counter()
    answers = worker.predict([text for text, _, _ in texts])
    seconds = time.perf_counter() - started
    n = len(texts)
    return {
        "first_half_label": round(sum(a["label"] == f for a, (_, f, _) in zip(answers, texts, strict=True)) / n, 4),
        "second_half_label": round(sum(a["label"] == s for a, (_, _, s) in zip(answers, texts, strict=True)) / n, 4),
        "second_half_probability": round(
            sum(a["probabilities"][s] for a, (_, _, s) in zip(answers, texts, strict=True)) / n, 4
        ),
        "truncated": round(sum(a["truncated"] for a in answers) / n, 4),
        "ms_per_text": round(1000 * seconds / n, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--val-file", type=Path, default=VAL_FILE)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--texts-per-half", type=int, default=6)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "long_texts.json")
    args = parser.parse_args(argv)
    if not args.archive.is_file():
        raise SystemExit(f"no archive at {args.archive}: make archive")
    texts = two_halves(args.val_file, args.count, args.texts_per_half, args.seed, max_text_chars())
    rows = {}
    for mode in ("truncate", "chunk"):
        with tempfile.TemporaryDirectory() as tmp:
            worker = InProcessWorker.from_archive(args.archive, Path(tmp), long_texts=mode)
            rows[mode] = measure(worker, texts)
            window = worker.handler.engine.max_length
        print(f"{mode:<9} {rows[mode]}", flush=True)
    rows["chunk"]["cost"] = round(rows["chunk"]["ms_per_text"] / rows["truncate"]["ms_per_text"], 2)
    report = {
        "archive": str(args.archive),
        "texts": len(texts),
        "texts_per_half": args.texts_per_half,
        "window_tokens": window,
        "mean_chars": round(sum(len(t) for t, _, _ in texts) / len(texts)),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"chunking costs {rows['chunk']['cost']}x the time of truncation per text; written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
