"""surogate/training/buckets.py: shape buckets chosen from the batch widths, against an exhaustive search."""

from __future__ import annotations

import itertools
import random

import pytest

from surogate.training.buckets import choose, padded_length


def _padding(widths, buckets) -> int:
    return sum(padded_length(w, buckets) - w for w in widths)


def _best_by_search(widths, most, align) -> int:
    values = sorted({-(-w // align) * align for w in widths})
    best = None
    for n in range(1, most + 1):
        for subset in itertools.combinations(values[:-1], n - 1):
            cost = _padding(widths, (*subset, values[-1]))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_choice_pads_least_as_an_exhaustive_search_finds(seed):
    rng = random.Random(seed)
    widths = [rng.randint(1, 200) for _ in range(rng.randint(5, 40))]
    for most in (1, 2, 3, 4):
        buckets = choose(widths, most=most, align=16)
        assert 1 <= len(buckets) <= most and list(buckets) == sorted(set(buckets))
        assert all(b % 16 == 0 for b in buckets) and buckets[-1] >= max(widths)
        assert _padding(widths, buckets) == _best_by_search(widths, most, 16)


def test_enough_buckets_leave_only_the_alignment_and_edge_cases():
    widths = [30, 31, 100, 250, 250]
    assert choose(widths, most=8, align=16) == (32, 112, 256)  # one bucket per distinct aligned width
    assert choose(widths, most=8, align=1) == (30, 31, 100, 250)
    assert choose([], most=4) == ()
    assert choose([1000], most=4, align=16, limit=1000) == (1000,)  # no padding past the model's positions
    with pytest.raises(ValueError, match="most and align must be >= 1"):
        choose(widths, most=0)


def test_many_distinct_long_widths_take_a_coarser_grid():
    widths = list(range(1, 32768, 7))  # 4,681 distinct widths: past 256 candidates at align 16
    buckets = choose(widths, most=12, align=16)
    assert len(buckets) == 12 and buckets[-1] >= max(widths) and all(b % 16 == 0 for b in buckets)
    even = tuple(-(-i * 32768 // 12 // 128) * 128 for i in range(1, 13))  # 12 evenly spaced on that grid (128)
    assert _padding(widths, buckets) <= _padding(widths, even)


def _aligned(widths, align):
    return [-(-w // align) * align for w in widths]


@pytest.mark.parametrize("seed", range(4))
def test_the_count_pays_for_itself_as_an_exhaustive_search_finds(seed):
    """With `runs`, the buckets minimise the run's padding (the widths on the grid, as the search sees them) plus
    `bucket_cost` batches of the mean width a bucket: the minimum over every set of at most `most` buckets."""
    rng = random.Random(seed)
    widths = _aligned([rng.randint(1, 300) for _ in range(rng.randint(5, 30))], 16)
    values = sorted(set(widths))
    mean = sum(widths) / len(widths)
    for runs, bucket_cost in itertools.product((0.5, 1, 4, 100), (0, 2, 30)):
        def total(buckets):
            return runs * _padding(widths, buckets) + len(buckets) * bucket_cost * mean
        buckets = choose(widths, most=4, align=16, runs=runs, bucket_cost=bucket_cost)
        best = min(total((*subset, values[-1])) for n in range(1, 5)
                   for subset in itertools.combinations(values[:-1], n - 1))
        assert total(buckets) == pytest.approx(best)


def test_a_short_run_takes_fewer_buckets_than_a_long_one():
    rng = random.Random(0)
    widths = sorted(rng.randint(60, 480) for _ in range(100))  # an epoch of grouped batches, GSM8K-like
    short, long_, free = choose(widths, runs=1), choose(widths, runs=10_000), choose(widths)
    assert 1 <= len(short) < len(long_) == len(free) == 12
    assert _padding(widths, short) > _padding(widths, long_)
    assert choose(widths, runs=1, bucket_cost=0) == free  # buckets that cost nothing: every one that saves padding
    with pytest.raises(ValueError, match="runs must be > 0"):
        choose(widths, runs=0)
