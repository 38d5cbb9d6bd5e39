"""Retry chains: which attempts belong together, in which order, and how they ended.

A chain links attempts through ``previous_attempt_id``; where that is missing, attempts of
the same workflow and action pair follow each other by ``attempt_number``. The functions
here are pure over rows, except :func:`plan_links` and :func:`apply_links`, which read the
groups a batch touches and write their chains back inside the ingest transaction.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

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
        return _specification(self.rows, self.accepted)


def _order_key(row: dict):
    return (row.get("attempt_number") or 0, row.get("created_ts") or 0.0, row.get("id") or 0)


def link(rows: Sequence[dict]) -> list[Chain]:
    """Split the attempts of one (source, workflow, action pair) group into ordered chains.

    Args:
        rows: artifact rows with at least source, workflow_id, action_pair_id, artifact_id,
            previous_attempt_id, attempt_number, status, created_ts and locator.
    """
    return [_chain(ordered) for ordered in _split(rows)]


def stored_chain(rows: Sequence[dict], chain_id: str) -> Chain:
    """The chain of rows that linking already put under ``chain_id`` (ordered, not re-linked)."""
    return _chain(sorted(rows, key=_order_key), chain_id)


def _split(rows: Sequence[dict]) -> list[list[dict]]:
    """The chains of one group, each as its attempts in order, ordered by their first."""
    if len(rows) <= 1:
        return [list(rows)] if rows else []
    ordered = sorted(rows, key=_order_key)
    if not ordered[0].get("previous_attempt_id") and all(
        b.get("previous_attempt_id") == a["artifact_id"] and b["artifact_id"] != a["artifact_id"]
        for a, b in itertools.pairwise(ordered)
    ):
        return [ordered]  # the usual case: one chain, each attempt naming the one before
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
    chains = [sorted(members, key=_order_key) for members in groups.values()]
    chains.sort(key=lambda c: _order_key(c[0]))
    return chains


def _chain_id(first: dict) -> str:
    """A chain is named after its group and its first attempt's locator."""
    root = f"{first['source']}\0{first['workflow_id']}\0{first['action_pair_id']}\0{first['locator']}"
    return hashlib.blake2b(root.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def _outcome(ordered: Sequence[dict]) -> tuple[str, dict | None, int]:
    """(outcome, the first accepted attempt or None, rejected attempts before it)."""
    rejected = 0
    for row in ordered:
        status = row["status"]
        if status == "accepted":
            return (REFINED if rejected else FIRST_TRY), row, rejected
        if status == "rejected":
            rejected += 1
    # Never accepted: exhausted once something was rejected and nothing is still pending.
    if rejected and not any(row["status"] == "pending" for row in ordered):
        return EXHAUSTED, None, rejected
    return OPEN, None, rejected


def _specification(ordered: Sequence[dict], accepted: dict | None) -> str:
    """The task's text: the accepted attempt's, else the first attempt's that has one."""
    if accepted is not None and accepted.get("specification"):
        return accepted["specification"]
    for row in ordered:
        if row.get("specification"):
            return row["specification"]
    return ""


def _chain(ordered: list[dict], chain_id: str | None = None) -> Chain:
    first = ordered[0]
    outcome, accepted, _ = _outcome(ordered)
    return Chain(
        chain_id or _chain_id(first),
        first["source"],
        first["workflow_id"],
        first["action_pair_id"],
        tuple(ordered),
        outcome,
        accepted,
    )


_LINK_COLUMNS = (
    "id",
    "source",
    "locator",
    "artifact_id",
    "workflow_id",
    "action_pair_id",
    "previous_attempt_id",
    "attempt_number",
    "status",
    "created_ts",
    "specification",
    "chain_id",
)


@dataclass
class LinkPlan:
    """What linking a batch changes: computed before the batch's rows are written."""

    groups: set[tuple[str, str, str]]  # groups whose old chains are replaced
    moved: list[tuple[str, int]]  # (chain_id, artifact id) of stored rows that changed chain
    chains: list[tuple]  # chains rows; accepted_id is resolved from (source, locator) on write


def plan_links(conn, batch_rows: Sequence[dict]) -> LinkPlan:
    """Link the groups a batch touches, stored rows and the batch's new rows together.

    Sets ``chain_id`` on each batch row (so it is written once, with its chain) and returns
    what else must change. One read for all the groups, whatever their number: this runs
    inside every ingest transaction, so it works on rows and tuples, not :class:`Chain`.
    """
    members: dict[tuple[str, str, str], dict[str, dict]] = {}
    for row in batch_rows:
        key = (row["source"], row["workflow_id"], row["action_pair_id"])
        group = members.get(key)
        if group is None:
            members[key] = group = {}
        group[row["locator"]] = row
    workflows: dict[str, set[str]] = defaultdict(set)
    for source, workflow_id, _ in members:
        workflows[source].add(workflow_id)
    stored = set()  # groups with rows already in the buffer (and maybe chains)
    cols = ", ".join(_LINK_COLUMNS)
    for source, workflow_ids in workflows.items():
        ids = sorted(workflow_ids)
        for i in range(0, len(ids), 900):
            chunk = ids[i : i + 900]
            cur = conn.execute(
                f"SELECT {cols} FROM artifacts WHERE source = ? AND workflow_id IN ({', '.join('?' * len(chunk))})",
                (source, *chunk),
            )
            for values in cur:
                key = (source, values[4], values[5])
                group = members.get(key)
                if group is not None:
                    stored.add(key)
                    if values[2] not in group:  # the batch's version of a row wins over the stored one
                        group[values[2]] = dict(zip(_LINK_COLUMNS, values, strict=True))
    moved, chains = [], []
    for (source, workflow_id, action_pair_id), by_locator in members.items():
        for ordered in _split(list(by_locator.values())):
            chain_id = _chain_id(ordered[0])
            for r in ordered:
                if "id" not in r:
                    r["chain_id"] = chain_id  # a batch row: written with its chain
                elif r["chain_id"] != chain_id:
                    moved.append((chain_id, r["id"]))
            outcome, accepted, retries = _outcome(ordered)
            stamps = [r["created_ts"] or 0.0 for r in ordered]
            chains.append(
                (
                    chain_id,
                    source,
                    workflow_id,
                    action_pair_id,
                    len(ordered),
                    retries,
                    source,
                    accepted["locator"] if accepted else None,
                    outcome,
                    _specification(ordered, accepted),
                    min(stamps),
                    max(stamps),
                )
            )
    return LinkPlan(stored, moved, chains)


def apply_links(conn, plan: LinkPlan, now: float) -> None:
    """Write a plan's chains (after the batch's rows, whose ids the chains refer to)."""
    conn.executemany("DELETE FROM chains WHERE source = ? AND workflow_id = ? AND action_pair_id = ?", plan.groups)
    conn.executemany("UPDATE artifacts SET chain_id = ? WHERE id = ?", plan.moved)
    conn.executemany(
        "INSERT INTO chains (chain_id, source, workflow_id, action_pair_id, attempts, rejected, "
        "accepted_id, outcome, specification, first_ts, last_ts, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, (SELECT id FROM artifacts WHERE source = ? AND locator = ?), ?, ?, ?, ?, ?)",
        [c + (now,) for c in plan.chains],
    )


# -- what an example is made of ------------------------------------------------------------------
# The columns a filter policy looks at. ``facts`` computes them from a chain; the examples table
# stores the same values, so a policy gives the same answer in Python and in SQL.


def target(chain: Chain) -> dict | None:
    """The attempt an example teaches: the accepted one, else (never accepted) the last one."""
    if chain.accepted is not None:
        return chain.accepted
    return chain.rows[-1] if chain.rows else None


def facts(chain: Chain) -> dict:
    """The values filter policies test, for one chain."""
    row = target(chain) or {}
    return {
        "outcome": chain.outcome,
        "retries": chain.retries,
        "origin": row.get("origin") or "generated",
        "generated_only": int(all((r.get("origin") or "generated") == "generated" for r in chain.rows)),
        "action_pair_id": chain.action_pair_id,
        "created_ts": row.get("created_ts") or 0.0,
    }


# -- filter policies -------------------------------------------------------------------------------


class PolicyError(ValueError):
    "A filter policy expression does not parse; the message names the offending token."


@dataclass(frozen=True)
class PolicyContext:
    """The plain values some policies need.

    Args:
        min_retries: ``high_value`` keeps chains with at least this many rejected attempts
            before the accepted one.
        since: ``recent`` keeps chains whose example attempt was created at or after this
            epoch time.
        action_pairs: when not empty, only chains of these action pairs are selected at all.
    """

    min_retries: int
    since: float = 0.0
    action_pairs: tuple[str, ...] = ()


# name -> (python test over facts, SQL over the examples table's columns)
_ATOMS = {
    "refinement": (lambda f, c: f["outcome"] == REFINED, lambda c: ("outcome = 'refined'", [])),
    "all_successes": (
        lambda f, c: f["outcome"] in (FIRST_TRY, REFINED),
        lambda c: ("outcome IN ('first_try', 'refined')", []),
    ),
    "first_try": (lambda f, c: f["outcome"] == FIRST_TRY, lambda c: ("outcome = 'first_try'", [])),
    "exhausted": (lambda f, c: f["outcome"] == EXHAUSTED, lambda c: ("outcome = 'exhausted'", [])),
    "generator_only": (lambda f, c: bool(f["generated_only"]), lambda c: ("generated_only = 1", [])),
    "human_only": (
        lambda f, c: f["origin"] == "human" and f["outcome"] in (FIRST_TRY, REFINED),
        lambda c: ("origin = 'human' AND outcome IN ('first_try', 'refined')", []),
    ),
    "high_value": (lambda f, c: f["retries"] >= c.min_retries, lambda c: ("retries >= ?", [c.min_retries])),
    "recent": (lambda f, c: f["created_ts"] >= c.since, lambda c: ("created_ts >= ?", [c.since])),
    "all": (lambda f, c: True, lambda c: ("1", [])),
}
POLICY_NAMES = tuple(_ATOMS) + ("action_pair:<id>",)

_TOKEN = re.compile(r"\s*(?:(\()|(\))|([^\s()]+))")


@dataclass(frozen=True)
class Policy:
    """A parsed filter policy: atoms combined with and / or / not and parentheses.

    Atoms: refinement (accepted after at least one rejected attempt), all_successes (first-attempt
    successes too; ``selection.policy``'s default), first_try, exhausted (never accepted),
    generator_only (every attempt came from the generator), human_only (the accepted answer
    was written by a human), high_value (at least ``min_retries`` retries), recent (created at
    or after ``since``), all, and ``action_pair:<id>``.
    """

    text: str
    tree: tuple

    def matches(self, fact: dict, ctx: PolicyContext) -> bool:
        if ctx.action_pairs and fact["action_pair_id"] not in ctx.action_pairs:
            return False
        return _eval(self.tree, fact, ctx)

    def where(self, ctx: PolicyContext) -> tuple[str, list]:
        """The policy as an SQL condition over the examples table, with its parameters."""
        sql, params = _sql(self.tree, ctx)
        if ctx.action_pairs:
            marks = ", ".join("?" for _ in ctx.action_pairs)
            sql, params = f"({sql}) AND action_pair_id IN ({marks})", params + list(ctx.action_pairs)
        return sql, params

    @property
    def atoms(self) -> set[str]:
        out: set[str] = set()

        def walk(node):
            if node[0] == "atom":
                out.add(node[1] if node[1] != "action_pair" else f"action_pair:{node[2]}")
            else:
                for child in node[1:]:
                    walk(child)

        walk(self.tree)
        return out

    def __str__(self) -> str:
        return self.text


def parse_policy(text: str) -> Policy:
    """Parse a policy expression such as ``"refinement and (generator_only or high_value)"``.

    Raises:
        PolicyError: naming the token that does not fit and where it is.
    """
    tokens: list[tuple[str, int]] = []
    pos = 0
    text = text or ""
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:  # only trailing whitespace is left
            break
        which = m.lastindex or 0  # every alternative of _TOKEN is a group of its own
        tokens.append((m.group(which), m.start(which)))
        pos = m.end()
    if not tokens:
        raise PolicyError("empty policy; expected one of " + ", ".join(POLICY_NAMES))
    i = 0

    def peek() -> str | None:
        return tokens[i][0].lower() if i < len(tokens) else None

    def fail(expected: str) -> NoReturn:
        if i >= len(tokens):
            raise PolicyError(f"policy {text!r} ends too early: expected {expected}")
        tok, at = tokens[i]
        raise PolicyError(f"unexpected {tok!r} at position {at} in policy {text!r}: expected {expected}")

    def parse_or():
        nonlocal i
        node = parse_and()
        while peek() == "or":
            i += 1
            node = ("or", node, parse_and())
        return node

    def parse_and():
        nonlocal i
        node = parse_not()
        while peek() == "and":
            i += 1
            node = ("and", node, parse_not())
        return node

    def parse_not():
        nonlocal i
        tok = peek()
        if tok == "not":
            i += 1
            return ("not", parse_not())
        if tok == "(":
            i += 1
            node = parse_or()
            if peek() != ")":
                fail("')'")
            i += 1
            return node
        if tok is None or tok in ("and", "or", ")"):
            fail("a policy name or '('")
        word, at = tokens[i]
        if tok.startswith("action_pair:"):
            ident = word.split(":", 1)[1]
            if not ident:
                raise PolicyError(f"'action_pair:' at position {at} needs an id, as in action_pair:g_coder")
            i += 1
            return ("atom", "action_pair", ident)
        if tok not in _ATOMS:
            raise PolicyError(
                f"unknown policy {word!r} at position {at} in {text!r}; expected one of " + ", ".join(POLICY_NAMES)
            )
        i += 1
        return ("atom", tok, None)

    tree = parse_or()
    if i < len(tokens):
        fail("'and', 'or' or the end")
    return Policy(text.strip(), tree)


def _eval(node: tuple, fact: dict, ctx: PolicyContext) -> bool:
    op = node[0]
    if op == "and":
        return _eval(node[1], fact, ctx) and _eval(node[2], fact, ctx)
    if op == "or":
        return _eval(node[1], fact, ctx) or _eval(node[2], fact, ctx)
    if op == "not":
        return not _eval(node[1], fact, ctx)
    if node[1] == "action_pair":
        return fact["action_pair_id"] == node[2]
    return bool(_ATOMS[node[1]][0](fact, ctx))


def _sql(node: tuple, ctx: PolicyContext) -> tuple[str, list]:
    op = node[0]
    if op in ("and", "or"):
        left, lp = _sql(node[1], ctx)
        right, rp = _sql(node[2], ctx)
        return f"({left} {op.upper()} {right})", lp + rp
    if op == "not":
        inner, params = _sql(node[1], ctx)
        return f"(NOT {inner})", params
    if node[1] == "action_pair":
        return "action_pair_id = ?", [node[2]]
    sql, params = _ATOMS[node[1]][1](ctx)
    return f"({sql})", params


def select(chains: Iterable[Chain], policy: Policy, ctx: PolicyContext) -> list[Chain]:
    """The chains a policy selects (pure)."""
    return [c for c in chains if policy.matches(facts(c), ctx)]
