"""Training-time text noise: the typos, casing and punctuation people produce, drawn afresh for
every example in every epoch.

The noise is applied when a batch is built (:class:`NoisySplit`), so each epoch sees a different
version of each training text, and the validation split stays clean. Every draw is seeded by
``(seed, epoch, example index)``: a run is reproducible and independent of batch order or world
size. The evaluation perturbations (:mod:`training.perturb`) are separate code with their own
seeds, so the robustness metrics never replay this noise.

A typo in a word is one of: a keyboard-neighbour substitution (QWERTY), a deletion, a
transposition of two neighbouring letters, or a doubled letter.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from training.batching import TokenizedSplit
from training.data import Example

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
    """Letters next to each letter on a QWERTY keyboard: left and right on its row, and the two keys
    touching it on the row above (same and next column) and below (previous and same column)."""
    near: dict[str, str] = {}
    for r, row in enumerate(_ROWS):
        for c, ch in enumerate(row):
            spots = [(r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c)]
            near[ch] = "".join(_ROWS[r2][c2] for r2, c2 in spots if 0 <= r2 < len(_ROWS) and 0 <= c2 < len(_ROWS[r2]))
    return near


KEYBOARD_NEIGHBOURS: dict[str, str] = _neighbours()
TYPO_KINDS = ("substitute", "delete", "transpose", "double")


@dataclass(frozen=True)
class Noise:
    """How much noise :func:`noisy` puts in a text.

    Attributes:
        example_rate: Share of examples that get any noise at all (the rest stay clean, so the
            model keeps seeing the texts as written).
        word_rate: In a noisy example, the chance that each word of ``min_word_length`` letters
            or more gets one typo.
        min_word_length: Shorter words are never misspelt.
        kinds: The typo kinds drawn from, uniformly (a subset of :data:`TYPO_KINDS`).
        case_rate: Chance that a noisy example is written in capitals or with a capital first letter.
        punctuation_rate: Chance that a noisy example gets a run of ``!``/``?``/``.`` appended, or
            loses its apostrophes.
    """

    example_rate: float = 0.0
    word_rate: float = 0.0
    min_word_length: int = 3
    kinds: tuple[str, ...] = TYPO_KINDS
    case_rate: float = 0.0
    punctuation_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("example_rate", "word_rate", "case_rate", "punctuation_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} must lie in [0, 1], got {value!r}")
        if self.min_word_length < 2:
            raise ValueError(f"augment.min_word_length must be at least 2, got {self.min_word_length!r}")
        unknown = sorted(set(self.kinds) - set(TYPO_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"augment.kinds must be a non-empty subset of {list(TYPO_KINDS)}, got {list(self.kinds)}")

    @property
    def active(self) -> bool:
        """Whether any text can change at all."""
        return self.example_rate > 0 and (self.word_rate > 0 or self.case_rate > 0 or self.punctuation_rate > 0)

    @classmethod
    def from_config(cls, cfg) -> Noise:
        """From the Hydra ``augment`` group (any mapping with a subset of the fields)."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in dict(cfg or {}).items() if k in names}
        if "kinds" in given:
            given["kinds"] = tuple(given["kinds"])
        return cls(**given)


def typo(word: str, kind: str, rng: random.Random) -> str:
    """``word`` with one typo of the given kind at a random position (unchanged if none fits)."""
    n = len(word)
    if n == 0:
        return word
    if kind == "substitute":
        spots = [i for i, ch in enumerate(word) if ch.lower() in KEYBOARD_NEIGHBOURS]
        if not spots:
            return word
        i = rng.choice(spots)
        new = rng.choice(KEYBOARD_NEIGHBOURS[word[i].lower()])
        return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1 :]
    if kind == "delete":
        if n < 2:
            return word
        i = rng.randrange(n)
        return word[:i] + word[i + 1 :]
    if kind == "transpose":
        if n < 2:
            return word
        i = rng.randrange(n - 1)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "double":
        i = rng.randrange(n)
        return word[: i + 1] + word[i] + word[i + 1 :]
    raise ValueError(f"unknown typo kind {kind!r}; choose one of {list(TYPO_KINDS)}")


def noisy(text: str, noise: Noise, rng: random.Random) -> str:
    """``text`` as a hurried writer might have typed it (or unchanged, for ``1 - example_rate``)."""
    if not noise.active or rng.random() >= noise.example_rate:
        return text
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= noise.min_word_length and word.isalpha() and rng.random() < noise.word_rate:
            words[i] = typo(word, rng.choice(noise.kinds), rng)
    out = " ".join(words)
    if rng.random() < noise.case_rate:
        out = out.upper() if rng.random() < 0.5 else out[:1].upper() + out[1:]
    if rng.random() < noise.punctuation_rate:
        out = out.replace("'", "") if "'" in out and rng.random() < 0.5 else out + rng.choice("!?.") * rng.randint(2, 5)
    return out


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one example's noise in one epoch (independent of batch order)."""
    return random.Random(f"augment:{seed}:{epoch}:{index}")


class NoisySplit(TokenizedSplit):
    """A training split whose batches hold freshly perturbed texts, tokenised when collated.

    :meth:`lengths` reports the clean texts' token counts (used for length buckets; a typo moves a
    text by a token or two). :meth:`set_epoch` picks the epoch whose noise the next batches get.
    Labels, and so the soft targets a distillation teacher computed on the clean texts, stay
    aligned by example index.
    """

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int, noise: Noise, seed: int) -> None:
        super().__init__(examples, tokenizer, max_length)
        self.texts = [e.text for e in examples]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.noise = noise
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the noise of ``epoch`` from now on."""
        self.epoch = epoch

    def texts_of(self, indices: Sequence[int]) -> list[str]:
        """The perturbed texts that the batch of ``indices`` holds in the current epoch."""
        return [noisy(self.texts[i], self.noise, example_rng(self.seed, self.epoch, i)) for i in indices]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Perturb, tokenise and pad the given examples."""
        encoded = self.tokenizer(
            self.texts_of(indices),
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def training_split(
    examples: Sequence[Example], tokenizer, max_length: int, cfg, seed: int
) -> TokenizedSplit | NoisySplit:
    """The training split for the ``augment`` config ``cfg``: noisy if it changes any text, else plain."""
    noise = Noise.from_config(cfg)
    if noise.active:
        return NoisySplit(examples, tokenizer, max_length, noise, seed)
    return TokenizedSplit(examples, tokenizer, max_length)
