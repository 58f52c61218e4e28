"""Fetch the public ``dair-ai/emotion`` dataset from the Hugging Face hub as split files.

For online users only: nothing else in the project needs the hub. The conversion
from the hub's rows (``text`` plus an integer ``label``) to :class:`Example` is a
separate function so it can be checked on local data.
"""

from __future__ import annotations

import logging
import numbers
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
        ValueError: A row's text is missing, not a string or empty, its label is not an integer id
            in range, or the hub has labels the project does not know (each names the row).
    """
    unknown = set(hub_label_names) - set(labels)
    if unknown:
        raise ValueError(f"hub split {split!r} has labels this project does not know: {sorted(unknown)}")
    examples = []
    for index, row in enumerate(rows):
        where = f"hub split {split!r} row {index}"
        text, label_id = row.get("text"), row.get("label")
        if not isinstance(text, str):
            raise ValueError(f"{where}: text is {type(text).__name__}, not a string")
        # bool is an int to Python, and a float label would be cut to an id without a word
        if isinstance(label_id, bool) or not isinstance(label_id, numbers.Integral):
            raise ValueError(f"{where}: label {label_id!r} is not an integer class id")
        text = " ".join(text.split())
        if not text:
            raise ValueError(f"{where}: empty text")
        if not 0 <= label_id < len(hub_label_names):
            raise ValueError(f"{where}: label id {label_id} out of range")
        examples.append(Example(text=text, label=labels.index(hub_label_names[label_id])))
    return examples


def split_label_names(dataset: Mapping[str, Any], name: str, hub_split: str) -> list[str]:
    """The label names of one split of a hub dataset, after checking that the split exists, has
    ``text`` and ``label`` columns, and that ``label`` is a class label (names in id order).

    Raises:
        ValueError: Naming the dataset, the split and what it has instead.
    """
    if hub_split not in dataset:
        raise ValueError(f"hub dataset {name!r} has no split {hub_split!r} (it has {sorted(dataset)})")
    split = dataset[hub_split]
    missing = {"text", "label"} - set(split.column_names)
    if missing:
        raise ValueError(
            f"hub dataset {name!r} split {hub_split!r} lacks the column(s) {sorted(missing)} "
            f"(it has {split.column_names})"
        )
    names = getattr(split.features["label"], "names", None)
    if not names:
        raise ValueError(
            f"hub dataset {name!r} split {hub_split!r}: column 'label' is {split.features['label']}, "
            "not a class label with names"
        )
    return list(names)


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
        names = split_label_names(dataset, name, hub_split)
        split = dataset[hub_split]
        path = out_dir / f"{stem}.txt"
        count = write_split(path, rows_to_examples(split, names, hub_split))
        log.info("wrote %d examples from %s[%s] to %s", count, name, hub_split, path)
        written[stem] = path
    return written
