"""Optimizer-step and micro-batch cuts: every row exactly once, at most max_rows per
micro-batch, length buckets pad less than fixed chunks, the per-micro-batch cost decides."""

from __future__ import annotations

import itertools
import random

import pytest

from rlhfspec_workers.micro_batches import length_buckets, split_even


def _padded(micros: list[list[int]], length: dict[int, int]) -> int:
    return sum(len(m) * max(length[r] for r in m) for m in micros)


def test_split_even_sizes_differ_by_at_most_one() -> None:
    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_even([4, 5], 4) == [[4], [5]]


def test_length_buckets_cover_rows_once_and_pad_less_than_fixed_chunks() -> None:
    rng = random.Random(0)
    rows = rng.sample(range(1000), 128)
    # Long-tailed like rollouts: most short, a few near the cap.
    length = {r: 10 + min(50, int(rng.expovariate(1 / 10))) for r in rows}
    micros = length_buckets(rows, [length[r] for r in rows], max_rows=64, overhead=64)
    assert sorted(r for m in micros for r in m) == sorted(rows)
    assert all(1 <= len(m) <= 64 for m in micros)
    # Shortest first, and each micro-batch's rows are no longer than the next one's.
    for a, b in itertools.pairwise(micros):
        assert max(length[r] for r in a) <= min(length[r] for r in b)
    ordered = sorted(rows, key=lambda r: (length[r], r))
    fixed = [ordered[k : k + 64] for k in range(0, 128, 64)]
    assert _padded(micros, length) + 64 * len(micros) < _padded(fixed, length) + 64 * 2
    assert _padded(micros, length) < 0.85 * _padded(fixed, length)
    assert micros == length_buckets(rows, [length[r] for r in rows], 64, 64)  # deterministic


def test_length_buckets_overhead_decides_the_number_of_cuts() -> None:
    rows = list(range(6))
    lengths = [5, 5, 9, 9, 20, 20]
    # Free micro-batches: one per distinct length, no padding at all.
    assert length_buckets(rows, lengths, max_rows=6, overhead=0) == [[0, 1], [2, 3], [4, 5]]
    # Costly ones: a single micro-batch padded to 20.
    assert length_buckets(rows, lengths, max_rows=6, overhead=1000) == [rows]
    # max_rows still binds: two cuts, the long pair alone (4 x 9 + 2 x 20 < 2 x 5 + 4 x 20).
    assert length_buckets(rows, lengths, max_rows=4, overhead=1000) == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="lengths"):
        length_buckets(rows, lengths[:-1], 4, 0)
