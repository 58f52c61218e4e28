"""Validation metrics and length-bucketed batching."""

import pytest

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
