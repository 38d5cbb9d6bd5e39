"""Live rollback: compare first-attempt acceptance in production, per adapter version.

When the generator records in each artifact's metadata which adapter produced it (the key
``evaluation.live_metadata_key``, e.g. ``{"adapter_version": "v0007-20261121T031502Z"}`` or
the vLLM name ``"lorad-v0007-…"``), the buffer knows, for every version, how many first
attempts it made, how many the guard accepted, and how many attempts it made in all (its
mean attempts per task: what E[retries] → 0 is about). `lorad history` and `lorad report`
show both per version. If the active version's first-try rate is significantly below the
previous version's — a one-sided two-proportion z-test at ``live_confidence``, once both
have at least ``live_min_attempts`` first attempts — the active version is rolled back.

The statistics are pure functions; :func:`live_counts` is the thin query over the buffer.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorad.evaluation.gate import RollbackDecision

if TYPE_CHECKING:
    from lorad.config import Settings


@dataclass(frozen=True)
class Rate:
    """First attempts of one version and how many were accepted; ``generated``: every attempt
    it answered (first attempts and retries)."""

    accepted: int
    attempts: int
    generated: int = 0

    @property
    def value(self) -> float:
        return self.accepted / self.attempts if self.attempts else math.nan

    @property
    def mean_attempts(self) -> float:
        """Attempts per task it started (1.0 = every first attempt accepted)."""
        return self.generated / self.attempts if self.attempts else math.nan

    def as_dict(self) -> dict:
        return {
            "accepted": self.accepted,
            "attempts": self.attempts,
            "generated": self.generated,
            "first_try": None if not self.attempts else self.value,
            "mean_attempts": None if not self.attempts else self.mean_attempts,
        }


def two_proportion_test(worse: Rate, better: Rate) -> tuple[float, float]:
    """One-sided pooled z-test of H1: rate(worse) < rate(better).

    Returns:
        (z, p-value). z is negative when ``worse`` really is lower; with no variance at all
        (both rates 0 or both 1) the test cannot reject: (0.0, 1.0).
    """
    n1, n2 = worse.attempts, better.attempts
    if not n1 or not n2:
        return 0.0, 1.0
    pooled = (worse.accepted + better.accepted) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (worse.value - better.value) / se
    p = 0.5 * math.erfc(-z / math.sqrt(2))  # P(Z <= z)
    return z, p


def decide_live(active: Rate, previous: Rate, confidence: float, min_attempts: int) -> RollbackDecision:
    """Whether the live numbers call for rolling the active version back."""
    if active.attempts < min_attempts or previous.attempts < min_attempts:
        return RollbackDecision(
            False,
            [
                f"not enough live first attempts yet (active {active.attempts}, previous "
                f"{previous.attempts}; {min_attempts} each are needed)"
            ],
        )
    z, p = two_proportion_test(active, previous)
    sentence = (
        f"live first-attempt acceptance {active.value:.1%} ({active.accepted}/{active.attempts}, "
        f"{active.mean_attempts:.2f} attempts a task) vs previous {previous.value:.1%} "
        f"({previous.accepted}/{previous.attempts}, {previous.mean_attempts:.2f} attempts a task): "
        f"z = {z:.2f}, one-sided p = {p:.4f}"
    )
    alpha = 1 - confidence
    if p < alpha:
        return RollbackDecision(True, [sentence + f" < {alpha:.4g}: significantly worse"])
    return RollbackDecision(False, [sentence + f" >= {alpha:.4g}: not significantly worse"])


def live_counts(conn: sqlite3.Connection, metadata_key: str, versions: list[str]) -> dict[str, Rate]:
    """First-attempt counts per version from the buffer's artifacts, and every attempt it made.

    An artifact counts for a version when its metadata value under ``metadata_key`` is the
    version name or ends with it (``lorad-v0007-…``); a first attempt is attempt 1, or an
    artifact with no previous attempt; ``generated`` counts the version's generated attempts
    of any number (a person's amendment is not one). Pending artifacts (no verdict yet) are
    not counted.
    """
    path = '$."' + metadata_key.replace('"', '\\"') + '"'
    rows = conn.execute(
        """
        SELECT tag, sum(first AND accepted), sum(first), sum(generated)
        FROM (SELECT json_extract(metadata, ?) AS tag,
                     (attempt_number = 1 OR (attempt_number IS NULL AND previous_attempt_id IS NULL)) AS first,
                     (status = 'accepted' OR (status != 'rejected' AND passed = 1)) AS accepted,
                     coalesce(origin, 'generated') = 'generated' AS generated
              FROM artifacts
              WHERE metadata IS NOT NULL AND json_valid(metadata) AND json_extract(metadata, ?) IS NOT NULL
                AND status != 'pending')
        GROUP BY tag
        """,
        (path, path),
    ).fetchall()
    counts = {v: [0, 0, 0] for v in versions}
    for tag, accepted, total, generated in rows:
        tag = str(tag)
        for v in versions:
            if tag == v or tag.endswith("-" + v):
                counts[v][0] += int(accepted or 0)
                counts[v][1] += int(total or 0)
                counts[v][2] += int(generated or 0)
                break
    return {v: Rate(a, n, g) for v, (a, n, g) in counts.items()}


def live_rates(settings: Settings, versions: list[str]) -> dict[str, Rate]:
    """version -> Rate from the state directory's buffer, for `lorad history` and `lorad report`;
    {} without a buffer or a live_metadata_key. Read-only: safe beside a running daemon."""
    from lorad.buffer.store import Buffer, BufferError

    key = settings.evaluation.live_metadata_key
    if not key or not versions or not settings.buffer_path.exists():
        return {}
    try:
        with Buffer(settings.buffer_path, readonly=True) as buffer:
            return live_counts(buffer.conn, key, versions)
    except (BufferError, sqlite3.Error):
        return {}
