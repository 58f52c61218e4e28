"""Validation metrics and length-bucketed batching."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from training.batching import bucketed_batches
from training.metrics import classification_metrics


def test_metrics_on_a_hand_checked_case():
    # gold: a a b b c ; predicted: a b b b a  -> tp a=1 b=2 c=0
    metrics = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    # a: p=1/2 r=1/2 f=1/2; b: p=2/3 r=1 f=4/5; c: 0
    assert metrics["per_class_f1"] == pytest.approx({"a": 0.5, "b": 0.8, "c": 0.0})
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8) / 3)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0], ["a", "b"])
    for gold, predicted in (([0, -1], [0, 1]), ([0, 1], [0, 2])):  # a negative id would wrap around
        with pytest.raises(ValueError, match="label ids"):
            classification_metrics(gold, predicted, ["a", "b"])


def test_a_label_absent_from_gold_and_predictions_does_not_lower_macro_f1():
    metrics = classification_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "unseen"])
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert metrics["macro_f1_labels"] == ["a", "b"]
    # absent, not 0.0: nothing to compute its F1, precision or recall from
    assert metrics["per_class_f1"]["unseen"] is None
    assert metrics["per_class_precision"]["unseen"] is None and metrics["per_class_recall"]["unseen"] is None


@settings(deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), min_size=1, max_size=60)
        )
    )
)
def test_metrics_agree_with_scikit_learn(case):
    n, pairs = case
    gold, predicted = [g for g, _ in pairs], [p for _, p in pairs]
    names = [f"l{i}" for i in range(n)]
    metrics = classification_metrics(gold, predicted, names)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro", zero_division=0))
    every = list(range(n))
    for key, score in (
        ("per_class_precision", precision_score),
        ("per_class_recall", recall_score),
        ("per_class_f1", f1_score),
    ):
        expected = score(gold, predicted, labels=every, average=None, zero_division=0)
        defined = {"per_class_precision": predicted, "per_class_recall": gold, "per_class_f1": gold + predicted}[key]
        for i, name in enumerate(names):
            # None exactly where there is nothing to compute from (scikit-learn's zero_division 0)
            assert (metrics[key][name] is None) == (i not in defined), (key, name)
            assert (metrics[key][name] or 0.0) == pytest.approx(expected[i])
    assert sum(map(sum, metrics["confusion_matrix"])) == len(pairs) == metrics["support"]


LENGTHS = [(i * 7919) % 61 + 3 for i in range(1000)]


def test_every_example_lands_in_exactly_one_batch():
    batches = bucketed_batches(LENGTHS, 32, seed=1, epoch=1)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert all(len(b) <= 32 for b in batches)


def test_order_is_reproducible_and_changes_between_epochs():
    assert bucketed_batches(LENGTHS, 32, seed=1, epoch=1) == bucketed_batches(LENGTHS, 32, seed=1, epoch=1)
    assert bucketed_batches(LENGTHS, 32, seed=1, epoch=1) != bucketed_batches(LENGTHS, 32, seed=1, epoch=2)


def padded_tokens(batches):
    return sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)


def test_buckets_cut_padding():
    bucketed = bucketed_batches(LENGTHS, 32, seed=1, epoch=1, bucket=True)
    plain = bucketed_batches(LENGTHS, 32, seed=1, epoch=1, bucket=False)
    assert padded_tokens(bucketed) < 0.8 * padded_tokens(plain)


def test_ranks_get_disjoint_equal_shares():
    shards = [bucketed_batches(LENGTHS, 32, seed=1, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])
    seen = [{i for b in shard for i in b} for shard in shards]
    assert not seen[0] & seen[1]
