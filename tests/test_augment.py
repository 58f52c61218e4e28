"""Training-time noise (training/augment.py) and the evaluation's perturbations (training/perturb.py)."""

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.augment import (
    KEYBOARD_NEIGHBOURS,
    TYPO_KINDS,
    Noise,
    NoisySplit,
    example_rng,
    noisy,
    training_split,
    typo,
)
from training.batching import TokenizedSplit
from training.config import compose
from training.data import Example
from training.perturb import PERTURBATIONS, ROBUSTNESS, metric_key, perturb

from .helpers import tiny_overrides

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=14)
sentences = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz'", min_size=1, max_size=10), min_size=1, max_size=12)


def is_subsequence(short: str, long: str) -> bool:
    letters = iter(long)
    return all(ch in letters for ch in short)


def test_keyboard_neighbours_are_symmetric_and_adjacent():
    assert set(KEYBOARD_NEIGHBOURS) == set("abcdefghijklmnopqrstuvwxyz")
    for key, near in KEYBOARD_NEIGHBOURS.items():
        assert key not in near and len(set(near)) == len(near)
        for other in near:
            assert key in KEYBOARD_NEIGHBOURS[other], (key, other)
    assert set(KEYBOARD_NEIGHBOURS["s"]) == set("adwezx")
    assert set(KEYBOARD_NEIGHBOURS["p"]) == set("ol")


@settings(max_examples=200, deadline=None)
@given(word=words, seed=st.integers(0, 2**32), upper=st.booleans())
def test_each_typo_kind_makes_exactly_its_kind_of_change(word, seed, upper):
    word = word.upper() if upper else word
    rng = random.Random(seed)
    sub = typo(word, "substitute", rng)
    assert len(sub) == len(word)
    changed = [i for i, (a, b) in enumerate(zip(word, sub, strict=True)) if a != b]
    assert len(changed) == 1
    i = changed[0]
    assert sub[i].lower() in KEYBOARD_NEIGHBOURS[word[i].lower()] and sub[i].isupper() == word[i].isupper()

    deleted = typo(word, "delete", rng)
    assert len(deleted) == len(word) - 1 and is_subsequence(deleted, word)

    swapped = typo(word, "transpose", rng)
    assert sorted(swapped) == sorted(word) and len(swapped) == len(word)
    assert sum(a != b for a, b in zip(word, swapped, strict=True)) in (0, 2)  # 0: two equal letters

    doubled = typo(word, "double", rng)
    assert len(doubled) == len(word) + 1 and is_subsequence(word, doubled)
    assert any(doubled[k] == doubled[k + 1] for k in range(len(doubled) - 1))


def test_an_unknown_typo_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown typo kind 'swap'"):
        typo("word", "swap", random.Random(0))


@settings(max_examples=150, deadline=None)
@given(parts=sentences, seed=st.integers(0, 10_000), epoch=st.integers(0, 50))
def test_noise_is_reproducible_and_keeps_the_words_in_place(parts, seed, epoch):
    text = " ".join(parts)
    noise = Noise(example_rate=1.0, word_rate=0.5)
    first = noisy(text, noise, example_rng(seed, epoch, 3))
    assert first == noisy(text, noise, example_rng(seed, epoch, 3))
    out = first.split(" ")
    assert len(out) == len(parts)  # typos change letters inside words, never the word boundaries
    for before, after in zip(parts, out, strict=True):
        if len(before) < noise.min_word_length or not before.isalpha():
            assert after == before
        else:
            assert abs(len(after) - len(before)) <= 1


@settings(max_examples=100, deadline=None)
@given(parts=sentences, seed=st.integers(0, 10_000))
def test_no_noise_at_a_zero_rate(parts, seed):
    text = " ".join(parts)
    for noise in (Noise(), Noise(example_rate=0.0, word_rate=1.0, case_rate=1.0), Noise(example_rate=1.0)):
        assert not noise.active
        assert noisy(text, noise, random.Random(seed)) == text


def test_the_rates_set_how_much_changes():
    text = "i feel so happy and loved today because my friends came over"
    light = Noise(example_rate=0.5, word_rate=0.1)
    heavy = Noise(example_rate=1.0, word_rate=0.5)

    def changed_words(noise):
        count = 0
        for i in range(400):
            out = noisy(text, noise, example_rng(1, 1, i)).split(" ")
            count += sum(a != b for a, b in zip(text.split(" "), out, strict=True))
        return count / 400

    assert changed_words(light) < changed_words(heavy)
    untouched = sum(noisy(text, light, example_rng(1, 1, i)) == text for i in range(400)) / 400
    assert untouched > 0.5  # half the examples are skipped, and some draws change nothing


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("example_rate", 1.5, r"augment.example_rate must lie in \[0, 1\]"),
        ("word_rate", -0.1, r"augment.word_rate must lie in \[0, 1\]"),
        ("min_word_length", 1, "augment.min_word_length must be at least 2"),
        ("kinds", ("substitute", "swap"), "augment.kinds must be a non-empty subset"),
        ("kinds", (), "augment.kinds must be a non-empty subset"),
    ],
)
def test_noise_settings_out_of_range_are_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        Noise(**{field: value})


def test_the_released_configs_compose_the_augmentation_groups():
    assert not Noise.from_config(compose([]).augment).active
    robust = Noise.from_config(compose(["experiment=robust"]).augment)
    assert robust.active and set(robust.kinds) == set(TYPO_KINDS)
    assert compose(["experiment=robust"]).experiment_name == "robust"
    from training.train import check_config

    with pytest.raises(ValueError, match=r"augment\.word_rate"):
        check_config(compose(["experiment=robust", "augment.word_rate=2"]))


class WordTokenizer:
    """A stand-in tokenizer: one id per character, [CLS]=1 and [SEP]=2, pad 0."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=64, padding=False, return_tensors=None):
        import torch

        ids = [[1, *[3 + ord(c) % 50 for c in t][: max_length - 2], 2] for t in texts]
        if not padding:
            return {"input_ids": ids}
        width = max(map(len, ids))
        return {
            "input_ids": torch.tensor([row + [0] * (width - len(row)) for row in ids]),
            "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids]),
        }


def test_a_noisy_split_draws_per_example_and_epoch_independent_of_batch_order():
    examples = [Example(f"i really do feel terribly anxious about number {i}", i % 6) for i in range(40)]
    split = training_split(examples, WordTokenizer(), 64, {"example_rate": 1.0, "word_rate": 0.5}, seed=7)
    assert isinstance(split, NoisySplit)
    split.set_epoch(1)
    forward = split.texts_of(range(40))
    assert split.texts_of([5, 3]) == [forward[5], forward[3]]
    assert sum(a != e.text for a, e in zip(forward, examples, strict=True)) > 20
    split.set_epoch(2)
    assert split.texts_of(range(40)) != forward  # a new draw each epoch
    batch = split.collate([4, 0, 9])
    assert batch["labels"].tolist() == [4, 0, 3]
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(t) + 2 for t in split.texts_of([4, 0, 9])]
    assert split.lengths() == TokenizedSplit(examples, WordTokenizer(), 64).lengths()
    assert type(training_split(examples, WordTokenizer(), 64, {}, seed=7)) is TokenizedSplit


@pytest.mark.slow
def test_an_augmented_run_trains_and_records_its_noise(tmp_path):
    from training.train import train

    cfg = compose(tiny_overrides(tmp_path, "augment=typos", "augment.example_rate=1.0"))
    metrics = train(cfg)
    written = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert written["augment"]["example_rate"] == 1.0 and written["augment"]["word_rate"] == 0.25
    assert metrics["steps"] == 6


# The evaluation's perturbations: not the training noise replayed.


@settings(max_examples=100, deadline=None)
@given(parts=sentences, seed=st.integers(0, 1000))
def test_evaluation_typos_only_swap_inner_letters_at_their_rate(parts, seed):
    text = " ".join(parts)
    for name in ("typos", "typos (heavy)"):
        out = perturb([text], name, seed)[0].split(" ")
        for before, after in zip(parts, out, strict=True):
            assert sorted(before) == sorted(after)
            assert after[:1] == before[:1] and after[-1:] == before[-1:]


@settings(max_examples=100, deadline=None)
@given(parts=sentences, seed=st.integers(0, 1000))
def test_the_other_evaluation_typos_keep_the_outer_letters_and_make_as_many_edits_as_they_say(parts, seed):
    text = " ".join(parts)
    dropped = perturb([text], "typos (letters dropped or replaced)", seed)[0].split(" ")
    twice = perturb([text], "typos (two per word)", seed)[0].split(" ")
    for before, one, two in zip(parts, dropped, twice, strict=True):
        assert one[:1] == before[:1] and one[-1:] == before[-1:] and two[:1] == before[:1] and two[-1:] == before[-1:]
        if one != before:  # one letter dropped, or one replaced by another letter
            assert len(before) >= 4 and (
                len(one) == len(before) - 1 or sum(a != b for a, b in zip(one, before, strict=True)) == 1
            )
        if two != before:  # two swaps of neighbours, apart: four letters moved, the same letters
            assert len(before) >= 6 and sorted(two) == sorted(before)
            assert sum(a != b for a, b in zip(two, before, strict=True)) in (2, 4)


def test_heavy_typos_change_more_words_than_typos():
    texts = ["i am feeling quite overwhelmed and rather lonely tonight"] * 300
    changed = Counter()
    for name in ("typos", "typos (heavy)"):
        for before, after in zip(texts, perturb(texts, name), strict=True):
            changed[name] += sum(a != b for a, b in zip(before.split(), after.split(), strict=True))
    assert 0 < changed["typos"] < changed["typos (heavy)"]


def test_the_evaluate_stage_measures_every_robustness_perturbation_under_a_stable_key():
    assert set(ROBUSTNESS) == set(PERTURBATIONS) - {"none", "negation"}
    keys = [metric_key(name) for name in ROBUSTNESS]
    assert len(set(keys)) == len(keys)
    assert metric_key("truncation (first half)") == "truncation_first_half"
    assert all(k.replace("_", "").isalnum() for k in keys)
