"""plan_passes: splitting a batch into forward passes by token length."""

from __future__ import annotations

import itertools
import random

import pytest
from emotion_batch import plan_passes


def padded_cost(lengths: list[int], passes: list[list[int]], pass_cost: int) -> int:
    return sum(pass_cost + len(rows) * max(lengths[k] for k in rows) for rows in passes)


def every_split(order: list[int]):
    """All ways to cut ``order`` into contiguous runs."""
    for cuts in itertools.product((False, True), repeat=len(order) - 1):
        passes, current = [], [order[0]]
        for index, cut in zip(order[1:], cuts, strict=True):
            if cut:
                passes.append(current)
                current = []
            current.append(index)
        yield [*passes, current]


def test_every_text_runs_exactly_once_shortest_first():
    lengths = [30, 12, 64, 12, 25, 40, 13]
    passes = plan_passes(lengths, 16)
    flat = [k for rows in passes for k in rows]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[k] for k in flat] == sorted(lengths)


def test_a_long_outlier_gets_its_own_pass():
    assert plan_passes([10, 10, 50, 10], 16) == [[0, 1, 3], [2]]


def test_cost_bounds_the_number_of_passes():
    lengths = [5, 9, 14, 20, 27, 35, 44, 54]
    assert len(plan_passes(lengths, 0)) == len(set(lengths))
    assert plan_passes(lengths, 10_000) == [sorted(range(len(lengths)), key=lengths.__getitem__)]
    assert plan_passes([7, 7, 7], 0) == [[0, 1, 2]]


@pytest.mark.parametrize("seed", range(20))
def test_the_split_is_optimal(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(3, 64) for _ in range(rng.randint(1, 9))]
    pass_cost = rng.choice([0, 4, 16, 64])
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = min(padded_cost(lengths, split, pass_cost) for split in every_split(order))
    assert padded_cost(lengths, plan_passes(lengths, pass_cost), pass_cost) == best


def test_empty_batch_and_bad_cost():
    assert plan_passes([], 16) == []
    with pytest.raises(ValueError, match="pass_cost_tokens"):
        plan_passes([3], -1)
