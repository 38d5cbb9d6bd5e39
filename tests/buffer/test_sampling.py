"""Replay sampling: sizes, without replacement, weighting, reproducibility, sparse pools."""

from __future__ import annotations

import random

import pytest

from lorad.buffer.sampling import MAX_RETRY_WEIGHT, draw, sample_exact, split_sizes, weight


def pool_of(members: dict[int, int]):
    probes = []

    def probe(seqs):
        probes.append(len(seqs))
        return {s: members[s] for s in seqs if s in members}

    def scan(lo, hi):
        return [(s, r) for s, r in sorted(members.items()) if lo < s <= hi]

    return probe, scan, probes


@pytest.mark.parametrize(
    "n, ratio, new, expected",
    [
        (2000, 0.5, 5000, (1000, 1000)),  # plenty of new: the ratio holds
        (2000, 0.5, 20, (20, 20)),  # few new: the replayed share keeps the ratio to them
        (2000, 0.25, 30, (30, 10)),
        (2000, 0.0, 50, (50, 0)),
        (2000, 1.0, 50, (0, 2000)),
        (10, 0.5, 0, (0, 0)),
    ],
)
def test_split_sizes_keep_the_replay_ratio(n, ratio, new, expected):
    assert split_sizes(n, ratio, new) == expected


def test_draws_without_replacement_and_reproducibly_from_a_large_range():
    members = {s: s % 4 for s in range(1, 1_000_001) if s % 5}
    probe, scan, probes = pool_of(members)
    got = draw(2000, 0, 1_000_000, probe, scan, random.Random(42), "uniform")
    assert len(got) == len(set(got)) == 2000 and all(s in members for s in got)
    assert sum(probes) < 20_000  # a few probe batches, not a million rows
    again = draw(2000, 0, 1_000_000, *pool_of(members)[:2], random.Random(42), "uniform")
    assert got == again
    assert draw(2000, 0, 1_000_000, *pool_of(members)[:2], random.Random(43), "uniform") != got


def test_draw_stays_inside_the_requested_range():
    members = {s: 0 for s in range(1, 200_001)}
    got = draw(500, 100_000, 150_000, *pool_of(members)[:2], random.Random(1))
    assert len(got) == len(set(got)) == 500  # else the range check below holds of nothing
    assert all(100_000 < s <= 150_000 for s in got)


def test_retry_weighting_favours_chains_that_needed_more_retries():
    members = {s: (0 if s % 2 else MAX_RETRY_WEIGHT) for s in range(1, 400_001)}
    got = draw(4000, 0, 400_000, *pool_of(members)[:2], random.Random(0), "retries")
    heavy = sum(1 for s in got if members[s] == MAX_RETRY_WEIGHT)
    # weights 8 : 1 -> about 8/9 of the draw
    assert 0.83 < heavy / len(got) < 0.94
    uniform = draw(4000, 0, 400_000, *pool_of(members)[:2], random.Random(0), "uniform")
    assert 0.45 < sum(1 for s in uniform if members[s]) / 4000 < 0.55


def test_sparse_pool_is_read_whole_and_returns_everything_it_has():
    members = {s: 1 for s in range(7, 1_000_000, 50_000)}  # 20 members in a million seqs
    probe, scan, _ = pool_of(members)
    got = draw(100, 0, 1_000_000, probe, scan, random.Random(0), "retries")
    assert sorted(got) == sorted(members)


def test_exact_weighted_sample_has_no_repeats_and_prefers_heavy_items():
    pool = [(i, MAX_RETRY_WEIGHT if i < 10 else 0) for i in range(100)]
    counts = [0] * 100
    rng = random.Random(5)
    for _ in range(300):
        picked = sample_exact(pool, 10, rng, "retries")
        assert len(set(picked)) == 10
        for p in picked:
            counts[p] += 1
    assert sum(counts[:10]) > 3 * sum(counts[10:20])


def test_unknown_weighting_is_an_error():
    with pytest.raises(ValueError, match="weighting"):
        weight(1, "loud")


def test_a_tighter_retry_bound_keeps_the_weighting_and_needs_fewer_probes():
    members = {s: (0 if s % 2 else 3) for s in range(1, 400_001)}
    probe, scan, probes = pool_of(members)
    got = draw(4000, 0, 400_000, probe, scan, random.Random(0), "retries", max_retries=3)
    heavy = sum(1 for s in got if members[s] == 3) / len(got)
    assert 0.75 < heavy < 0.85  # weights 4 : 1
    loose_probe, loose_scan, loose = pool_of(members)
    draw(4000, 0, 400_000, loose_probe, loose_scan, random.Random(0), "retries")
    assert sum(probes) < sum(loose)
