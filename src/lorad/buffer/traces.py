"""Retry chains: which attempts belong together, in which order, and how they ended.

A chain links attempts through ``previous_attempt_id``; where that is missing, attempts of
the same workflow and action pair follow each other by ``attempt_number``. The functions
here are pure over rows, except :func:`relink`, the thin wrapper that writes a group's
chains back to the buffer inside the ingest transaction.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Outcomes of a chain.
FIRST_TRY = "first_try"  # accepted on the first attempt
REFINED = "refined"  # accepted after at least one rejected attempt: a refinement
EXHAUSTED = "exhausted"  # only rejected attempts, nothing pending
OPEN = "open"  # still pending, or nothing decisive yet


@dataclass(frozen=True)
class Chain:
    chain_id: str
    source: str
    workflow_id: str
    action_pair_id: str
    rows: tuple[dict, ...]  # ordered attempts
    outcome: str
    accepted: dict | None  # the first accepted attempt, if any

    @property
    def rejected_before(self) -> tuple[dict, ...]:
        """The rejected attempts before the accepted one (all of them if none was accepted)."""
        out = []
        for row in self.rows:
            if row is self.accepted:
                break
            if row["status"] == "rejected":
                out.append(row)
        return tuple(out)

    @property
    def retries(self) -> int:
        return len(self.rejected_before)

    @property
    def specification(self) -> str:
        for row in (self.accepted, *self.rows):
            if row and row.get("specification"):
                return row["specification"]
        return ""


def _order_key(row: dict):
    return (row.get("attempt_number") or 0, row.get("created_ts") or 0.0, row.get("id") or 0)


def link(rows: Sequence[dict]) -> list[Chain]:
    """Split the attempts of one (source, workflow, action pair) group into ordered chains.

    Args:
        rows: artifact rows with at least source, workflow_id, action_pair_id, artifact_id,
            previous_attempt_id, attempt_number, status, created_ts and locator.
    """
    if not rows:
        return []
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_id: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_id[row["artifact_id"]].append(i)
    unlinked = []
    for i, row in enumerate(rows):
        prev = row.get("previous_attempt_id")
        targets = [j for j in by_id.get(prev, ()) if j != i] if prev else []
        if targets:
            union(i, targets[0])
        elif (row.get("attempt_number") or 1) > 1:
            unlinked.append(i)
    # No link recorded: the attempt follows the one numbered just before it.
    by_number: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_number[row.get("attempt_number") or 1].append(i)
    for i in unlinked:
        before = by_number.get(rows[i]["attempt_number"] - 1)
        if before:
            union(i, max(before, key=lambda j: _order_key(rows[j])))

    groups: dict[int, list[dict]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[find(i)].append(row)
    chains = [_chain(sorted(members, key=_order_key)) for members in groups.values()]
    chains.sort(key=lambda c: _order_key(c.rows[0]))
    return chains


def _chain(ordered: list[dict]) -> Chain:
    first = ordered[0]
    root = f"{first['source']}\0{first['workflow_id']}\0{first['action_pair_id']}\0{first['locator']}"
    chain_id = hashlib.blake2b(root.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()
    accepted = next((r for r in ordered if r["status"] == "accepted"), None)
    if accepted is not None:
        outcome = FIRST_TRY if not any(r["status"] == "rejected" for r in ordered[: ordered.index(accepted)]) else REFINED
    elif ordered and all(r["status"] in ("rejected", "superseded") for r in ordered) and any(
        r["status"] == "rejected" for r in ordered
    ):
        outcome = EXHAUSTED
    else:
        outcome = OPEN
    return Chain(chain_id, first["source"], first["workflow_id"], first["action_pair_id"],
                 tuple(ordered), outcome, accepted)


_LINK_COLUMNS = ("id", "source", "locator", "artifact_id", "workflow_id", "action_pair_id",
                 "previous_attempt_id", "attempt_number", "status", "created_ts", "specification")


def relink(conn, groups: Iterable[tuple[str, str, str]], now: float) -> None:
    """Recompute the chains of the given groups and store them (inside the caller's transaction)."""
    cols = ", ".join(_LINK_COLUMNS)
    for source, workflow_id, action_pair_id in groups:
        rows = [
            dict(zip(_LINK_COLUMNS, r))
            for r in conn.execute(
                f"SELECT {cols} FROM artifacts WHERE source = ? AND workflow_id = ? AND action_pair_id = ?",
                (source, workflow_id, action_pair_id),
            )
        ]
        conn.execute(
            "DELETE FROM chains WHERE source = ? AND workflow_id = ? AND action_pair_id = ?",
            (source, workflow_id, action_pair_id),
        )
        for chain in link(rows):
            conn.executemany(
                "UPDATE artifacts SET chain_id = ? WHERE id = ?",
                [(chain.chain_id, r["id"]) for r in chain.rows],
            )
            conn.execute(
                "INSERT INTO chains (chain_id, source, workflow_id, action_pair_id, attempts, rejected, "
                "accepted_id, outcome, specification, first_ts, last_ts, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    chain.chain_id, source, workflow_id, action_pair_id, len(chain.rows), chain.retries,
                    chain.accepted["id"] if chain.accepted else None, chain.outcome, chain.specification,
                    min((r["created_ts"] or 0.0) for r in chain.rows),
                    max((r["created_ts"] or 0.0) for r in chain.rows), now,
                ),
            )
