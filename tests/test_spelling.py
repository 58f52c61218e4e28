"""Typo correction before tokenization (handler/emotion_spelling.py): the words stage, the
speller's choice against a brute-force oracle on generated vocabularies and typos, what it leaves
alone, and the engine and archive reading texts through it."""

from __future__ import annotations

import json
import shutil
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from project import handler_module
from serving.archive import WORDS_SUFFIX, beside, build_archive
from tests.helpers import FIXTURE_DATA
from training.words import write_words

spelling = handler_module("emotion_spelling")
engine_module = handler_module("emotion_engine")
settings_module = handler_module("emotion_settings")

WORDS = st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=9)


def distance_one(a: str, b: str) -> bool:
    """Whether ``b`` is one deletion, insertion, replacement or swap of neighbours from ``a``
    (written apart from the speller's own edit generator)."""
    if a == b:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long = sorted((a, b), key=len)
    if len(long) - len(short) != 1:
        return False
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


@given(a=st.text(alphabet="abc", max_size=6), b=st.text(alphabet="abc", max_size=6))
@settings(max_examples=500, deadline=None)
def test_one_edit_apart_agrees_with_the_definition(a, b):
    assert spelling.one_edit_apart(a, b) == distance_one(a, b) == spelling.one_edit_apart(b, a)


def oracle(speller, word: str) -> str:
    """The speller's rule, by brute force over every known word."""
    if speller.known(word):
        return word
    known = set(speller.counts) | speller.vocabulary
    near = [k for k in known if distance_one(word, k)]
    if not near:
        return word
    return min(near, key=lambda k: (-speller.counts.get(k, 0), k not in speller.vocabulary, k))


@st.composite
def spellers(draw):
    counted = draw(st.dictionaries(WORDS, st.integers(1, 50), min_size=1, max_size=30))
    vocabulary = draw(st.frozensets(WORDS, max_size=10))
    return spelling.Speller(counted, vocabulary)


@st.composite
def typo_of(draw, word: str) -> str:
    i = draw(st.integers(0, len(word) - 1))
    letter = draw(st.sampled_from(string.ascii_lowercase))
    kind = draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
    if kind == "delete":
        return word[:i] + word[i + 1 :]
    if kind == "insert":
        return word[:i] + letter + word[i:]
    if kind == "replace":
        return word[:i] + letter + word[i + 1 :]
    return word[:i] + word[i + 1 : i + 2] + word[i] + word[i + 2 :] if i + 1 < len(word) else word


@given(data=st.data(), speller=spellers())
@settings(max_examples=300, deadline=None)
def test_a_typo_of_a_known_word_becomes_the_known_word_the_rule_picks(data, speller):
    word = data.draw(st.sampled_from(sorted(set(speller.counts) | speller.vocabulary)))
    typo = data.draw(typo_of(word))
    fixed = speller.correct_word(typo)
    if not spelling.MIN_LENGTH <= len(typo) <= spelling.MAX_LENGTH:
        assert fixed == typo
    else:
        assert fixed == oracle(speller, typo)
        assert speller.known(fixed)  # a typo of a known word always has a known word one edit away


@given(speller=spellers(), text=st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_only_words_change_everything_between_them_is_kept_and_a_second_reading_changes_nothing(speller, text):
    fixed, changed = speller.correct(text)
    words_in, words_out = spelling.WORD.findall(text), spelling.WORD.findall(fixed)
    assert spelling.WORD.split(fixed) == spelling.WORD.split(text)  # spaces, digits, punctuation, emoji
    assert changed == sum(a != b for a, b in zip(words_in, words_out, strict=True))
    for before, after in zip(words_in, words_out, strict=True):
        if after != before:  # only an unknown ASCII word of a sensible length, into a known one
            assert before.isascii() and not speller.known(before.lower())
            assert spelling.MIN_LENGTH <= len(before) <= spelling.MAX_LENGTH
            assert speller.known(after.lower())
    assert speller.correct(fixed) == (fixed, 0)


def test_case_is_kept_and_unknown_scripts_and_long_runs_are_left_alone():
    speller = spelling.Speller({"happy": 9, "angry": 4}, frozenset({"sad"}))
    assert speller.correct("Hapyp and HAPYP and hapyp!") == ("Happy and HAPPY and happy!", 3)
    assert speller.correct_word("sadd") == "sad"  # the tokenizer's whole words count too
    assert speller.correct_word("hä") == "hä" and speller.correct_word("häppy") == "häppy"
    assert speller.correct("hapyp\u0308 hapyp") == ("hapyp\u0308 happy", 1)  # an accent in decomposed form
    assert speller.correct_word("h" * 25) == "h" * 25
    assert speller.correct_word("xq") == "xq"  # shorter than MIN_LENGTH


def test_the_words_stage_counts_the_training_split_only(tmp_path):
    out = tmp_path / "emotion-x.words.json"
    document = write_words(FIXTURE_DATA / "train.txt", out)
    assert json.loads(out.read_text()) == document
    texts = [line.rsplit(";", 1)[0] for line in (FIXTURE_DATA / "train.txt").read_text().splitlines()]
    assert document["texts"] == len(texts)
    assert document["counts"] == spelling.count_words(texts)
    assert sum(document["counts"].values()) == sum(len(spelling.WORD.findall(t.lower())) for t in texts)


@pytest.mark.parametrize("text", ["[]", '{"counts": ["happy"]}', '{"counts": {"happy": "9"}}', "{}", "not json"])
def test_a_word_list_that_holds_no_counts_is_refused_by_name(tmp_path, text):
    path = tmp_path / spelling.WORDS_FILE
    path.write_text(text)
    with pytest.raises(ValueError, match=r"words\.json|Expecting"):
        spelling.read_words(path)


@pytest.mark.slow
def test_the_engine_and_the_archive_read_a_typo_as_the_word_it_corrects(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "emotion-tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    write_words(FIXTURE_DATA / "train.txt", beside(model_dir, WORDS_SUFFIX))
    counts = json.loads(beside(model_dir, WORDS_SUFFIX).read_text())["counts"]
    word = max((w for w in counts if len(w) >= 5 and w[1] != w[2]), key=lambda w: (counts[w], w))
    typo = word[0] + word[2] + word[1] + word[3:]  # two letters swapped
    assert typo not in counts
    store = build_archive(model_dir, tmp_path / "store").parent
    unpacked = tmp_path / "unpacked"
    shutil.unpack_archive(store / "emotion.mar", unpacked, "zip")
    assert json.loads((unpacked / spelling.WORDS_FILE).read_text())["counts"] == counts
    fp32 = settings_module.HandlerSettings()
    engine = engine_module.EmotionEngine(unpacked, fp32)
    plain = engine_module.EmotionEngine(unpacked, settings_module.HandlerSettings(correct_typos=False))
    text = f"i feel {typo} today"
    assert engine.read([text]) == [f"i feel {word} today"] and plain.read([text]) == [text]
    assert engine.predict([text]) == engine.predict([f"i feel {word} today"])
    assert engine.token_ids([text]) != plain.token_ids([text])
