"""Duplicate examples: exact (normalised hash) and near (MinHash with LSH banding).

An example's text is its specification and the answer it teaches. Two examples whose
normalised texts are equal are exact duplicates; two whose MinHash signatures estimate a
Jaccard similarity (over word 3-grams) at or above the threshold are near-duplicates. Of a
group, the most recent is kept.

LSH banding finds the candidates (tuned for recall, so a rare near-duplicate can still be
missed): a signature of ``num_perm`` values is cut into ``bands``
bands of ``rows`` values; examples that agree on a whole band become candidates, and only
those are compared. The band keys are plain integers, so the buffer keeps them in an indexed
table and a new example is checked against millions without loading them.

:func:`dedup` is the pure batch form (used by tests and as the reference); the incremental
form over the buffer lives in :mod:`lorad.buffer.examples`.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

NUM_PERM = 64
SHINGLE = 3
_WORD = re.compile(r"\w+|[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return _SPACE.sub(" ", text).strip()


def text_of(specification: str, answer: str) -> str:
    return f"{specification}\n\n{answer}"


def exact_key(text: str, kind: str = "") -> str:
    """Hash of the normalised text; ``kind`` keeps different sorts of example apart."""
    return hashlib.blake2b(f"{kind}\0{normalise(text)}".encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def shingles(text: str, k: int = SHINGLE) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return {" ".join(words).encode("utf-8", "surrogatepass")}
    return {" ".join(words[i : i + k]).encode("utf-8", "surrogatepass") for i in range(len(words) - k + 1)}


_PRIME = (1 << 61) - 1  # a Mersenne prime: the universal-hash modulus
_MASK = 0xFFFFFFFF


@lru_cache(maxsize=4)
def _permutations(num_perm: int):
    """(a, b) of the ``num_perm`` hash functions h -> (a*h + b) mod p, truncated to 32 bits.

    Fixed by a seed, so a signature computed today matches one computed next year. Both
    below 2**32, so a*h + b never overflows 64 bits for a 32-bit h.
    """
    import numpy as np

    rng = np.random.default_rng(1)
    a = rng.integers(1, 1 << 32, size=(num_perm, 1), dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=(num_perm, 1), dtype=np.uint64)
    return a, b


def signature(text: str, num_perm: int = NUM_PERM) -> bytes:
    """The MinHash signature of a text, as bytes (num_perm little-endian uint32 values)."""
    import numpy as np

    # crc32 maps a shingle to 32 bits in C; the random affine maps do the mixing.
    hashes = np.fromiter((zlib.crc32(sh) for sh in shingles(text)), dtype=np.uint64)
    a, b = _permutations(num_perm)
    values = ((a * hashes + b) % np.uint64(_PRIME)) & np.uint64(_MASK)
    return values.min(axis=1).astype("<u4").tobytes()


def similarity(a: bytes, b: bytes) -> float:
    """Estimated Jaccard similarity of two signatures (share of equal values)."""
    import numpy as np

    return float(np.mean(np.frombuffer(a, "<u4") == np.frombuffer(b, "<u4")))


def similarities(sig: bytes, others: list[bytes]):
    """:func:`similarity` of one signature against many at once (a numpy array)."""
    import numpy as np

    if not others:
        return np.zeros(0)
    mine = np.frombuffer(sig, "<u4")
    matrix = np.frombuffer(b"".join(others), "<u4").reshape(len(others), mine.size)
    return (matrix == mine).mean(axis=1)


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows) for ``threshold``, weighted toward recall.

    A missed candidate is a duplicate kept; a false candidate only costs one signature
    comparison. With 64 permutations and 0.9 this gives 6 bands of 10: a pair at 0.95
    becomes a candidate 99.6 % of the time, at 0.9 92 %.
    """
    import numpy as np

    def area(fn, lo: float, hi: float) -> float:
        xs = np.linspace(lo, hi, 257)
        return float(np.trapezoid(fn(xs), xs))

    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            # Probability that a pair at similarity s shares at least one band: 1-(1-s^r)^b.
            false_positive = area(lambda s: 1 - (1 - s**rows) ** bands, 0.0, threshold)  # noqa: B023 - integrated here
            false_negative = area(lambda s: (1 - s**rows) ** bands, threshold, 1.0)  # noqa: B023 - integrated here
            error = 0.05 * false_positive + 0.95 * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(sig: bytes, bands: int, rows: int) -> list[int]:
    """One signed 64-bit key per band (SQLite INTEGER)."""
    out = []
    for b in range(bands):
        chunk = sig[b * rows * 4 : (b + 1) * rows * 4]
        digest = hashlib.blake2b(chunk, digest_size=8, person=b"lorad-lsh").digest()
        out.append(int.from_bytes(digest, "little", signed=True))
    return out


@dataclass(frozen=True)
class Item:
    """One example as dedup sees it; ``order`` says which is more recent (larger = newer)."""

    key: object
    text: str
    order: tuple
    kind: str = ""


@dataclass
class DedupResult:
    kept: list  # keys
    dropped: dict  # key -> (key kept instead, "exact" | "near")

    @property
    def exact(self) -> int:
        return sum(1 for _, how in self.dropped.values() if how == "exact")

    @property
    def near(self) -> int:
        return sum(1 for _, how in self.dropped.values() if how == "near")


def dedup(items: Sequence[Item], threshold: float) -> DedupResult:
    """Drop exact and near duplicates, keeping the most recent of each group (pure).

    Items are taken newest first; each is kept unless an already kept item is an exact copy
    (same normalised text and kind) or has an estimated similarity of at least ``threshold``.
    """
    bands, rows = lsh_params(threshold)
    kept: list = []
    dropped: dict = {}
    by_hash: dict[str, object] = {}
    buckets: dict[tuple, list] = {}
    sigs: dict = {}
    for item in sorted(items, key=lambda it: it.order, reverse=True):
        h = exact_key(item.text, item.kind)
        if h in by_hash:
            dropped[item.key] = (by_hash[h], "exact")
            continue
        sig = signature(item.text)
        keys = band_keys(sig, bands, rows)
        twin = None
        for b, k in enumerate(keys):
            for other in buckets.get((item.kind, b, k), ()):
                if similarity(sig, sigs[other]) >= threshold:
                    twin = other
                    break
            if twin is not None:
                break
        if twin is not None:
            dropped[item.key] = (twin, "near")
            continue
        kept.append(item.key)
        by_hash[h] = item.key
        sigs[item.key] = sig
        for b, k in enumerate(keys):
            buckets.setdefault((item.kind, b, k), []).append(item.key)
    return DedupResult(kept, dropped)
