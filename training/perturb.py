"""Evaluation-time perturbations: what users do to texts, applied to the validation split.

The evaluate stage (:mod:`training.evaluate`) and ``make robustness``
(:mod:`monitoring.robustness`) measure accuracy under each of :data:`PERTURBATIONS`. Every
perturbation is seeded (``perturb(texts, name, seed)`` draws from one ``random.Random(seed)``
in text order), so two runs see the same texts. This is separate from the training-time noise of
:mod:`training.augment`: other typo models (inner letters only, never the first or last letter:
transpositions, drops and replacements by any letter without a keyboard model, and two
transpositions in one word), another generator and other seeds, so the evaluation does not replay
the noise a robust model was trained on.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from functools import partial

EMOJI = ("😂", "😭", "❤️", "🙄", "😡", "😱", "🔥", "🙏")
NEGATABLE = re.compile(r"\b(feel|feeling|am|was|is|felt)\b")
TYPO_RATE = 0.33  # the rate `make robustness` has always used
HEAVY_TYPO_RATE = 0.66


def typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str:
    """Swap two neighbouring inner letters in about ``rate`` of the words of four letters or more."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 4 and rng.random() < rate:
            k = rng.randrange(1, len(word) - 2)
            words[i] = word[:k] + word[k + 1] + word[k] + word[k + 2 :]
    return " ".join(words)


def letter_typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str:
    """Drop one inner letter, or replace it by a random other letter, in about ``rate`` of the
    words of four letters or more (no keyboard model: any letter is as likely)."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 4 and rng.random() < rate:
            k = rng.randrange(1, len(word) - 1)
            if rng.random() < 0.5:
                words[i] = word[:k] + word[k + 1 :]
            else:
                other = rng.choice([c for c in string.ascii_lowercase if c != word[k].lower()])
                words[i] = word[:k] + other + word[k + 1 :]
    return " ".join(words)


def two_typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str:
    """Two swaps of neighbouring inner letters, apart, in about ``rate`` of the words of six
    letters or more: two edits in one word, which no one-edit correction can undo."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 6 and rng.random() < rate:
            k = rng.randrange(1, len(word) - 4)
            m = rng.randrange(k + 2, len(word) - 2)
            word = word[:k] + word[k + 1] + word[k] + word[k + 2 :]
            words[i] = word[:m] + word[m + 1] + word[m] + word[m + 2 :]
    return " ".join(words)


def upper_case(text: str, rng: random.Random) -> str:
    """All capitals, as in shouted messages."""
    return text.upper()


def emoji(text: str, rng: random.Random) -> str:
    """Two emoji appended."""
    return f"{text} {rng.choice(EMOJI)}{rng.choice(EMOJI)}"


def repeated_punctuation(text: str, rng: random.Random) -> str:
    """A run of three to six exclamation or question marks appended."""
    return text + rng.choice("!?") * rng.randint(3, 6)


def truncation(text: str, rng: random.Random) -> str:
    """Only the first half of the words (at least one)."""
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def negation(text: str, rng: random.Random) -> str:
    """``not`` after the first feel/am/was/is ("i feel happy" -> "i feel not happy"); texts without
    such a verb get "i do not think that" in front."""
    if NEGATABLE.search(text):
        return NEGATABLE.sub(lambda m: m.group(0) + " not", text, count=1)
    return "i do not think that " + text


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "none": lambda text, rng: text,
    "typos": typos,
    "typos (heavy)": partial(typos, rate=HEAVY_TYPO_RATE),
    "typos (letters dropped or replaced)": letter_typos,
    "typos (two per word)": two_typos,
    "upper case": upper_case,
    "emoji": emoji,
    "repeated punctuation": repeated_punctuation,
    "truncation (first half)": truncation,
    "negation": negation,
}


# What the evaluate stage measures (negation changes what a text means, so it stays out of the
# accuracy metrics; `make robustness` still reports it).
ROBUSTNESS = tuple(name for name in PERTURBATIONS if name not in ("none", "negation"))
SEED = 0  # the evaluation's seed; training.augment seeds its own generators otherwise


def perturb(texts: Sequence[str], name: str, seed: int = SEED) -> list[str]:
    """``texts`` under the named perturbation, reproducibly.

    Raises:
        KeyError: ``name`` is not one of :data:`PERTURBATIONS`; the message lists them.
    """
    if name not in PERTURBATIONS:
        raise KeyError(f"no perturbation {name!r}; choose one of {list(PERTURBATIONS)}")
    rng = random.Random(seed)
    return [PERTURBATIONS[name](text, rng) for text in texts]


def metric_key(name: str) -> str:
    """The key of a perturbation in the DVC metrics (``"truncation (first half)"`` ->
    ``"truncation_first_half"``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
