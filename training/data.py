"""Loading, validating and writing the emotion dataset's split files.

A split file holds one example per line in the form ``text;label``. The label is
the last ``;``-separated field, so a text may itself contain semicolons. Every
problem in a file is reported with the file name and the 1-based line number;
nothing is silently dropped.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The labels in the order of the public dataset's integer ids (defined in project.py, which the
# serving image has too): the model config's id2label, the contract the serving side reads.
from project import LABELS  # noqa: E402

SPLITS: tuple[str, ...] = ("train", "val")


class DataFormatError(ValueError):
    """A split file has a line that is not a valid ``text;label`` example."""

    def __init__(self, path: Path | str, line_no: int, problem: str) -> None:
        self.path = Path(path)
        self.line_no = line_no
        self.problem = problem
        super().__init__(f"{path}:{line_no}: {problem}")


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: int


def parse_line(line: str, path: Path | str, line_no: int, labels: Sequence[str] = LABELS) -> Example:
    """Parse one ``text;label`` line.

    Args:
        line: The line without its trailing newline.
        path: File the line comes from (for the error message).
        line_no: 1-based line number (for the error message).
        labels: Known label names; the index in this sequence is the label id.

    Returns:
        The parsed example.

    Raises:
        DataFormatError: The line has no ``;``, an empty text or an unknown label.
    """
    text, sep, label = line.rpartition(";")
    if not sep:
        raise DataFormatError(path, line_no, "expected 'text;label' but found no ';'")
    text, label = text.strip(), label.strip()
    if not text:
        raise DataFormatError(path, line_no, "empty text")
    if label not in labels:
        raise DataFormatError(path, line_no, f"unknown label {label!r}; expected one of {', '.join(labels)}")
    return Example(text=text, label=labels.index(label))


def split_lines(path: Path | str) -> Iterator[tuple[int, str]]:
    """The lines of a split file with their 1-based numbers, as every reader of the project reads
    them: UTF-8, a byte order mark that starts the file dropped (Windows editors), lines ending at
    ``\n`` only (with the ``\r`` of a CRLF ending dropped), so a text may hold the characters
    ``str.splitlines`` breaks at (U+2028, U+0085, form feeds, ...).

    Raises:
        DataFormatError: A line is not valid UTF-8.
    """
    with Path(path).open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(path, line_no, f"not valid UTF-8 ({err.reason})") from None
            yield line_no, line.removesuffix("\n").removesuffix("\r")


def load_split(path: Path | str, labels: Sequence[str] = LABELS) -> list[Example]:
    """Read and validate a split file (training, evaluation, profiles).

    Args:
        path: A UTF-8 file of ``text;label`` lines (:func:`split_lines`).
        labels: Known label names in id order.

    Returns:
        The examples in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        DataFormatError: A line is malformed or holds a carriage return (other than the one of a
            CRLF line ending), or the file is not UTF-8 or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path} (set data.source_dir to the folder holding it)")
    examples: list[Example] = []
    for line_no, line in split_lines(path):
        if "\r" in line:  # a line break of old Mac files, which would join several examples into one
            raise DataFormatError(path, line_no, "carriage return inside the line (CR-only line endings?)")
        if not line.strip():
            raise DataFormatError(path, line_no, "blank line")
        examples.append(parse_line(line, path, line_no, labels))
    if not examples:
        raise DataFormatError(path, 0, "file holds no examples")
    return examples


def read_labelled(path: Path | str) -> list[tuple[str, str]]:
    """The ``(text, label)`` pairs of a split file, both stripped, without validation (load tests,
    benchmarks, drift references): lines without a ``;`` are skipped, and labels are kept as
    written. Lines as :func:`split_lines` reads them.
    """
    pairs = (line.rpartition(";") for _, line in split_lines(path))
    return [(text.strip(), label.strip()) for text, sep, label in pairs if sep]


def write_split(path: Path | str, examples: Iterable[Example], labels: Sequence[str] = LABELS) -> int:
    """Write examples as ``text;label`` lines; returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for example in examples:
            if "\n" in example.text or "\r" in example.text:
                raise ValueError(f"example {count + 1} for {path}: text contains a line break")
            handle.write(f"{example.text};{labels[example.label]}\n")
            count += 1
    return count


def class_counts(examples: Iterable[Example], labels: Sequence[str] = LABELS) -> dict[str, int]:
    """Count examples per label name, in label order."""
    counts = Counter(example.label for example in examples)
    return {name: counts.get(i, 0) for i, name in enumerate(labels)}


def duplicate_stats(train: Sequence[Example], val: Sequence[Example]) -> dict[str, int]:
    """What a split pair repeats: texts seen more than once within a split (and those of them whose
    copies disagree on the label), and validation texts that are also training texts (and those of
    them labelled differently there)."""
    stats: dict[str, int] = {}
    labels_of: dict[str, dict[str, set[int]]] = {}
    for name, examples in (("train", train), ("val", val)):
        counts = Counter(e.text for e in examples)
        texts = labels_of[name] = {}
        for e in examples:
            texts.setdefault(e.text, set()).add(e.label)
        stats[f"{name}_duplicate_texts"] = sum(1 for c in counts.values() if c > 1)
        stats[f"{name}_conflicting_labels"] = sum(1 for ls in texts.values() if len(ls) > 1)
    shared = labels_of["train"].keys() & labels_of["val"].keys()
    stats["texts_in_both_splits"] = len(shared)
    stats["texts_in_both_splits_relabelled"] = sum(1 for t in shared if labels_of["train"][t] != labels_of["val"][t])
    return stats


def file_md5(path: Path | str) -> str:
    """MD5 hex digest of a file, the checksum the dataset's MD5SUMS uses."""
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
