"""Typo correction before tokenization: a word the model has never seen as a whole is replaced by
the most frequent known word one edit away, so that ``hapyp`` reads as ``happy`` instead of the
word pieces ``hap ##yp``.

Known words are the training split's words (``words.json`` in the archive, written by the
pipeline's ``words`` stage from ``data/processed/train.txt``, with their counts) and the whole words
of the tokenizer's vocabulary. One edit is one of the four single-character typos people make
(Damerau-Levenshtein distance 1): a letter deleted, inserted, replaced, or two neighbours swapped.
The candidate with the highest training count wins; ties go to the tokenizer's whole words, then
to alphabetical order, so that the correction is deterministic.

Left alone: known words, words shorter than ``MIN_LENGTH`` or longer than ``MAX_LENGTH`` letters
(a long run of letters is no word a person meant), words with letters outside ASCII (the model and
its word list are English), and words with no known word one edit away. The cost of a word is
bounded by its length (about 54 lookups per letter), so a text's cost is bounded by its length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

WORDS_FILE = "words.json"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORD = re.compile(r"[^\W\d_]+")  # runs of letters, in any script
MIN_LENGTH = 3
MAX_LENGTH = 20


def edits(word: str) -> Iterable[str]:
    """Every string one edit from ``word`` (lower-case ASCII): deletions, swaps of neighbours,
    replacements and insertions of a letter (duplicates included)."""
    for i in range(len(word) + 1):
        head, tail = word[:i], word[i:]
        if tail:
            yield head + tail[1:]
            if len(tail) > 1:
                yield head + tail[1] + tail[0] + tail[2:]
            for letter in LETTERS:
                yield head + letter + tail[1:]
        for letter in LETTERS:
            yield head + letter + tail


def count_words(texts: Iterable[str]) -> dict[str, int]:
    """Counts of the lower-cased ASCII words of ``texts`` (what ``words.json`` holds)."""
    counts: dict[str, int] = {}
    for text in texts:
        for word in WORD.findall(text.lower()):
            if word.isascii():
                counts[word] = counts.get(word, 0) + 1
    return counts


def _cased_like(word: str, original: str) -> str:
    if original.isupper() and len(original) > 1:
        return word.upper()
    if original[0].isupper():
        return word[0].upper() + word[1:]
    return word


@dataclass(frozen=True)
class Speller:
    """Corrects the words of a text that are one typo away from a known word.

    Attributes:
        counts: Training counts of known words (lower case).
        vocabulary: Further known words (the tokenizer's whole words), count 0.
    """

    counts: Mapping[str, int]
    vocabulary: frozenset[str]

    def known(self, word: str) -> bool:
        return word in self.counts or word in self.vocabulary

    def correct_word(self, word: str) -> str:
        """``word``, or the known word one edit away that wins (module docstring), in the case
        pattern of ``word`` (all capitals, a capital first, or lower case)."""
        lower = word.lower()
        if not MIN_LENGTH <= len(lower) <= MAX_LENGTH or not lower.isascii() or not lower.isalpha():
            return word
        if self.known(lower):
            return word
        candidates = {e for e in edits(lower) if self.known(e)}
        if not candidates:
            return word
        best = min(candidates, key=lambda e: (-self.counts.get(e, 0), e not in self.vocabulary, e))
        return _cased_like(best, word)

    def correct(self, text: str) -> tuple[str, int]:
        """``text`` with its words corrected, and how many were changed. Everything between the
        words (spaces, punctuation, digits, emoji) is kept as it was."""
        changed = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal changed
            word = match.group(0)
            fixed = self.correct_word(word)
            changed += fixed != word
            return fixed

        return WORD.sub(replace, text), changed

    def correct_all(self, texts: list[str]) -> list[str]:
        return [self.correct(text)[0] for text in texts]


def load_speller(model_dir: Path, vocabulary: Iterable[str]) -> Speller | None:
    """The speller of a model directory: its ``words.json`` and the tokenizer's whole words
    ``vocabulary``; None when the directory has no word list."""
    path = Path(model_dir) / WORDS_FILE
    if not path.is_file():
        return None
    document = json.loads(path.read_text())
    counts = document["counts"]
    if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
        raise ValueError(f"{path}: 'counts' must map words to integer counts")
    return Speller({w.lower(): n for w, n in counts.items()}, frozenset(vocabulary))
