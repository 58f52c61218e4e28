"""Fetch the public ``dair-ai/emotion`` dataset from the Hugging Face hub as split files.

For online users only: nothing else in the project needs the hub. The conversion
from the hub's rows (``text`` plus an integer ``label``) to :class:`Example` is a
separate function so it can be checked on local data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from training.data import LABELS, Example, write_split

log = logging.getLogger(__name__)

# Hub split name -> local file stem.
HUB_SPLITS: dict[str, str] = {"train": "train", "validation": "val"}


def rows_to_examples(
    rows: Iterable[Mapping[str, Any]], hub_label_names: Sequence[str], split: str, labels: Sequence[str] = LABELS
) -> list[Example]:
    """Convert hub rows to examples, mapping the hub's label ids through their names.

    Args:
        rows: Mappings with a ``text`` string and an integer ``label``.
        hub_label_names: The hub dataset's label names in its id order.
        split: Split name, for error messages.
        labels: This project's label names in id order.

    Returns:
        The converted examples.

    Raises:
        ValueError: A row has an empty text, a line break, or a label the project does not know.
    """
    unknown = set(hub_label_names) - set(labels)
    if unknown:
        raise ValueError(f"hub split {split!r} has labels this project does not know: {sorted(unknown)}")
    examples = []
    for index, row in enumerate(rows):
        text = " ".join(str(row["text"]).split())
        label_id = int(row["label"])
        if not text:
            raise ValueError(f"hub split {split!r} row {index}: empty text")
        if not 0 <= label_id < len(hub_label_names):
            raise ValueError(f"hub split {split!r} row {index}: label id {label_id} out of range")
        examples.append(Example(text=text, label=labels.index(hub_label_names[label_id])))
    return examples


def download_splits(name: str, out_dir: Path | str) -> dict[str, Path]:  # pragma: no cover - needs the hub
    """Download the dataset from the hub and write ``train.txt`` and ``val.txt`` into ``out_dir``.

    Args:
        name: Hub dataset id, e.g. ``dair-ai/emotion``.
        out_dir: Folder for the split files.

    Returns:
        Local file path per split stem.
    """
    from datasets import load_dataset  # imported lazily: heavy, and only online users need it

    out_dir = Path(out_dir)
    dataset = load_dataset(name)
    written = {}
    for hub_split, stem in HUB_SPLITS.items():
        split = dataset[hub_split]
        names = split.features["label"].names
        path = out_dir / f"{stem}.txt"
        count = write_split(path, rows_to_examples(split, names, hub_split))
        log.info("wrote %d examples from %s[%s] to %s", count, name, hub_split, path)
        written[stem] = path
    return written
