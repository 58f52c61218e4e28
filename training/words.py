"""The pipeline's ``words`` stage: the training split's word counts, which the handler's typo
correction (``handler/emotion_spelling.py``) takes as its known words.

``python -m training.words --split data/processed/train.txt --out models/emotion-<experiment>.words.json``
writes ``{"source", "texts", "counts"}``; ``serving.archive`` packs the file as ``words.json``.
Only the training split is read: the validation split, on which the correction is measured,
contributes no word.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from project import TRAIN_FILE, handler_module
from training.data import load_split

spelling = handler_module("emotion_spelling")


def write_words(split: Path, out: Path) -> dict:
    """Count the words of ``split`` and write them to ``out``; returns the document written."""
    texts = [example.text for example in load_split(split)]
    counts = spelling.count_words(texts)
    document = {"source": str(split), "texts": len(texts), "counts": dict(sorted(counts.items()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=0) + "\n")
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the training split's word counts for typo correction")
    parser.add_argument("--split", type=Path, default=TRAIN_FILE)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    document = write_words(args.split, args.out)
    print(f"{len(document['counts'])} words of {document['texts']} texts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
