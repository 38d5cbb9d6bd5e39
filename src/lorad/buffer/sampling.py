"""Replay sampling: which examples go into one training set.

A training set of size n mixes examples that are new since the last promoted version with a
sample of older ones: ``replay_ratio`` of the set is replayed (when there are enough new
examples to fill the rest; with fewer, the replayed share keeps the same ratio to them).
Samples are drawn without replacement, uniformly or weighted toward chains that needed more
retries, and reproducibly from a seed.

The pool is a range of example sequence numbers plus a filter that only the database can
evaluate. Reading a million rows to sample two thousand is too slow, so :func:`draw` proposes
random sequence numbers, asks the database which of them are in the pool (one indexed
lookup per batch) and accepts each with probability weight / max weight; for a weighted
draw this accept-reject step gives each remaining member a chance proportional to its
weight, which is exactly weighted sampling without replacement. A pool too sparse for that
(or a small range) is read whole and sampled exactly.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence

# Weighting "retries": an example weighs 1 + its retries, counted up to this many.
MAX_RETRY_WEIGHT = 7
SMALL_RANGE = 5_000  # ranges up to this many sequence numbers are read whole
PROBE_BATCH = 2048

Probe = Callable[[list[int]], dict[int, int]]  # seqs -> {seq: retries} of those in the pool
Scan = Callable[[int, int], list[tuple[int, int]]]  # (lo, hi) -> the pool within (lo, hi]: [(seq, retries)]


def weight(retries: int, weighting: str) -> int:
    if weighting == "uniform":
        return 1
    if weighting == "retries":
        return 1 + min(max(retries, 0), MAX_RETRY_WEIGHT)
    raise ValueError(f"unknown weighting {weighting!r}; expected 'uniform' or 'retries'")


def split_sizes(n: int, replay_ratio: float, new_available: int) -> tuple[int, int]:
    """(new, replay) target sizes for a set of ``n`` with ``new_available`` new examples.

    The replay count is a target: a smaller pool of older examples gives fewer.
    """
    if not 0 <= replay_ratio <= 1:
        raise ValueError(f"replay_ratio must be between 0 and 1, got {replay_ratio}")
    if replay_ratio >= 1:
        return 0, n
    n_new = min(new_available, n - round(n * replay_ratio))
    n_replay = min(n - n_new, round(n_new * replay_ratio / (1 - replay_ratio)))
    return n_new, n_replay


def sample_exact(pool: Sequence[tuple[int, int]], k: int, rng: random.Random, weighting: str = "uniform") -> list[int]:
    """``k`` distinct keys of (key, retries) pairs: uniform, or weighted (Efraimidis-Spirakis)."""
    k = min(k, len(pool))
    if k <= 0:
        return []
    if weighting == "uniform":
        return [key for key, _ in rng.sample(list(pool), k)]
    keyed = ((rng.random() ** (1.0 / weight(r, weighting)), key) for key, r in pool)
    return [key for _, key in heapq.nlargest(k, keyed)]


def draw(
    k: int,
    lo: int,
    hi: int,
    probe: Probe,
    scan: Scan,
    rng: random.Random,
    weighting: str = "uniform",
    max_retries: int = MAX_RETRY_WEIGHT,
) -> list[int]:
    """``k`` distinct sequence numbers from the pool within (lo, hi], fewer if the pool is smaller.

    Args:
        probe: which of the given sequence numbers are in the pool, with their retries.
        scan: the whole pool within (lo, hi], for small or sparse ones.
        max_retries: an upper bound of the pool's retries (a tighter bound accepts more
            proposals of a weighted draw; a wrong one skews it).
    """
    if k <= 0 or hi <= lo:
        return []
    span = hi - lo
    if span <= max(SMALL_RANGE, 4 * k):
        return sample_exact(scan(lo, hi), k, rng, weighting)
    top = weight(min(max_retries, MAX_RETRY_WEIGHT), weighting)
    chosen: list[int] = []
    taken: set[int] = set()
    outside: set[int] = set()
    proposed = members = 0
    while len(chosen) < k:
        # Propose about as many as the hit rate so far says are still needed, plus a margin.
        rate = len(chosen) / proposed if chosen else 0.5
        size = min(PROBE_BATCH, max(64, int((k - len(chosen)) / max(rate, 0.05) * 1.25)))
        batch = [rng.randint(lo + 1, hi) for _ in range(size)]
        found = probe(sorted(set(batch) - taken - outside))
        proposed += len(batch)
        members += sum(1 for s in batch if s in found)
        for s in batch:
            if len(chosen) == k:
                break
            if s in taken or s in outside:
                continue
            retries = found.get(s)
            if retries is None:
                outside.add(s)
                continue
            if top == 1 or rng.random() * top < weight(retries, weighting):
                taken.add(s)
                chosen.append(s)
        # Too few members to find k by guessing: read the pool instead.
        if len(chosen) < k and members / proposed * span < 3 * k:
            return sample_exact(scan(lo, hi), k, rng, weighting)
    return chosen
