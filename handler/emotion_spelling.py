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
(a long run of letters is no word a person meant), words with letters outside ASCII or followed
by a combining accent (the model and its word list are English), and words with no known word
one edit away. Candidates are found through an index of the known words' single deletions (two
words one edit apart share a deletion, or one is a deletion of the other), so a word costs about
one lookup per letter, and a text's cost is bounded by its length.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

WORDS_FILE = "words.json"
WORD = re.compile(r"[^\W\d_]+")  # runs of letters, in any script
MIN_LENGTH = 3
MAX_LENGTH = 20


def deletions(word: str) -> set[str]:
    """Every string one deleted letter from ``word``."""
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def one_edit_apart(a: str, b: str) -> bool:
    """Whether ``b`` is one deletion, insertion, replacement or swap of neighbours from ``a``."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) != len(b):
        short, long = (a, b) if len(a) < len(b) else (b, a)
        i = next((i for i in range(len(short)) if short[i] != long[i]), len(short))
        return short[i:] == long[i + 1 :]
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    if len(diff) == 1:
        return True
    i, j = diff[0], diff[-1]
    return len(diff) == 2 and j == i + 1 and a[i] == b[j] and a[j] == b[i]


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


class Speller:
    """Corrects the words of a text that are one typo away from a known word.

    Attributes:
        counts: Training counts of known words (lower case).
        vocabulary: Further known words (the tokenizer's whole words), count 0.
    """

    def __init__(self, counts: Mapping[str, int], vocabulary: frozenset[str]) -> None:
        self.counts = dict(counts)
        self.vocabulary = frozenset(vocabulary)
        # Each known word under each of its single deletions (long words are never candidates).
        self._by_deletion: dict[str, list[str]] = {}
        for word in sorted(self.counts.keys() | self.vocabulary):
            if len(word) <= MAX_LENGTH + 1:
                for key in deletions(word):
                    self._by_deletion.setdefault(key, []).append(word)

    def known(self, word: str) -> bool:
        return word in self.counts or word in self.vocabulary

    def candidates(self, word: str) -> set[str]:
        """The known words one edit from ``word`` (lower case)."""
        found = {k for k in deletions(word) if self.known(k)}  # a letter inserted into k
        for key in (word, *deletions(word)):  # a letter deleted from, replaced in, or swapped in k
            found.update(self._by_deletion.get(key, ()))
        return {k for k in found if one_edit_apart(word, k)}

    def correct_word(self, word: str) -> str:
        """``word``, or the known word one edit away that wins (module docstring), in the case
        pattern of ``word`` (all capitals, a capital first, or lower case)."""
        lower = word.lower()
        if not MIN_LENGTH <= len(lower) <= MAX_LENGTH or not lower.isascii() or not lower.isalpha():
            return word
        if self.known(lower):
            return word
        candidates = self.candidates(lower)
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
            after = text[match.end() : match.end() + 1]
            if after and unicodedata.category(after).startswith("M"):
                return word  # a combining accent follows: the word is not plain ASCII as written
            fixed = self.correct_word(word)
            changed += fixed != word
            return fixed

        return WORD.sub(replace, text), changed

    def correct_all(self, texts: list[str]) -> list[str]:
        return [self.correct(text)[0] for text in texts]


def read_words(path: Path) -> dict[str, int]:
    """The word counts of a ``words.json`` (lower-cased); ``ValueError`` for a file that holds no
    word-to-count map."""
    document = json.loads(Path(path).read_text())
    counts = document.get("counts") if isinstance(document, dict) else None
    if not isinstance(counts, dict) or not all(isinstance(n, int) for n in counts.values()):
        raise ValueError(f"{path}: 'counts' must map words to integer counts")
    return {w.lower(): n for w, n in counts.items()}


def load_speller(model_dir: Path, vocabulary: Iterable[str]) -> Speller | None:
    """The speller of a model directory: its ``words.json`` and the tokenizer's whole words
    ``vocabulary``; None when the directory has no word list."""
    path = Path(model_dir) / WORDS_FILE
    return Speller(read_words(path), frozenset(vocabulary)) if path.is_file() else None
