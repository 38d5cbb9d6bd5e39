"""The examples table: training data materialised from the chains, and dataset snapshots.

:func:`refresh` turns every usable chain into one row of ``examples`` (idempotent; the daemon
calls it after each ingest). A row carries what filter policies test (outcome, retries,
origin, action pair, time), a sequence number that only grows (a chain that changes gets a
new one, so "new since version X" is ``seq > X``), its frozen held-out side and whether it is
a duplicate of a newer example. Policies are applied when reading, so changing the policy
needs no rebuild.

:func:`build_snapshot` draws one training set (new examples plus a replayed sample) and the
held-out set, formatted for the training method; :func:`count_new` tells the scheduler how
many new training examples arrived.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, overload

from lorad.buffer import dedup, formatting, sampling, split, traces
from lorad.buffer.schema import UNUSABLE_CHAINS
from lorad.buffer.store import Buffer
from lorad.config import SelectionSettings

SUCCESSES = ("first_try", "refined")
# Chains that do not become examples, and why.
SKIP_OPEN = "open"  # still pending, or nothing decided yet
SKIP_EMPTY_SPEC = "empty_specification"
DAY = 86400.0
# The [selection] keys a policy is evaluated with; refresh remembers them for count_new.
_POLICY_KEYS = ("policy", "min_retries", "recent_days", "action_pairs")


# -- selection values --------------------------------------------------------------------------


def _epoch(now: Any) -> float:
    """``now`` as epoch seconds: None (the clock), a number, or a datetime."""
    if now is None:
        return time.time()
    return now.timestamp() if hasattr(now, "timestamp") else float(now)


def policy_and_context(
    selection: SelectionSettings,
    now: float | None = None,
    *,
    policy: str | None = None,
    min_retries: int | None = None,
    since: float | None = None,
) -> tuple[traces.Policy, traces.PolicyContext]:
    """The parsed policy and its context from the [selection] section (explicit arguments win)."""
    now = _epoch(now)
    parsed = traces.parse_policy(policy or selection.policy)
    if since is None:
        since = now - selection.recent_days * DAY
    ctx = traces.PolicyContext(
        min_retries=min_retries if min_retries is not None else selection.min_retries,
        since=since,
        action_pairs=tuple(selection.action_pairs),
    )
    return parsed, ctx


# -- refresh -------------------------------------------------------------------------------------


@dataclass
class RefreshReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    duplicates: dict = field(default_factory=lambda: {"exact": 0, "near": 0})  # dropped by this refresh
    skipped: dict = field(default_factory=dict)  # reason -> chains, over the whole buffer
    totals: dict = field(default_factory=dict)  # examples, train, heldout, duplicates

    def as_dict(self) -> dict:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "totals": self.totals,
        }


@overload
def _state(conn, key: str) -> str | None: ...
@overload
def _state(conn, key: str, default: str) -> str: ...
def _state(conn, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM examples_state WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


def _set_state(conn, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO examples_state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


# What formatting and the examples table read of an artifact row.
CHAIN_COLUMNS = (
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
    "content",
    "feedback",
    "specification",
    "constraints",
    "feedback_history",
    "origin",
    "content_hash",
    "chain_id",
    "metadata",
)
# The texts read cut to max_chars (any of them may be megabytes: store.max_file_bytes allows it).
CUT_COLUMNS = ("content", "feedback", "specification", "constraints")
WHOLE_OR_NOTHING = ("feedback_history", "metadata")  # JSON: read only when no longer than max_chars
REFRESH_CHUNK = 1000  # chains a refresh reads at once


def chains_of(conn, chain_ids: Iterable[str], max_chars: int | None = None) -> dict[str, traces.Chain]:
    """The chains with these ids, from their artifact rows as linking stored them.

    Args:
        max_chars: read each of CUT_COLUMNS cut to this many characters, with a note of how
            many were left out (:func:`formatting.truncate`), and each of WHOLE_OR_NOTHING only
            when it is no longer (else None); SQLite cuts them, so a long text never reaches
            Python whole. None: read them whole (`lorad export`).
    """
    ids = list(chain_ids)
    by_chain: dict[str, list[dict]] = defaultdict(list)
    cols = []
    for c in CHAIN_COLUMNS:
        if max_chars is not None and c in CUT_COLUMNS:
            cols.append(f"substr(a.{c}, 1, {int(max_chars)}), length(a.{c})")
        elif max_chars is not None and c in WHOLE_OR_NOTHING:
            cols.append(f"CASE WHEN length(a.{c}) <= {int(max_chars)} THEN a.{c} END")
        else:
            cols.append(f"a.{c}")
    for i in range(0, len(ids), 5000):
        # Through the chain's group (artifacts_group): ingest keeps no index on chain_id.
        for values in conn.execute(
            f"SELECT {', '.join(cols)} FROM chains c JOIN artifacts a ON a.source = c.source "
            "AND a.workflow_id = c.workflow_id AND a.action_pair_id = c.action_pair_id AND a.chain_id = c.chain_id "
            "WHERE c.chain_id IN (SELECT value FROM json_each(?))",
            (json.dumps(ids[i : i + 5000]),),
        ):
            row, values = {}, iter(values)
            for c in CHAIN_COLUMNS:
                row[c] = next(values)
                if max_chars is not None and c in CUT_COLUMNS:
                    length = next(values)
                    if row[c] is not None:
                        row[c] = formatting.truncate(row[c], max_chars, length)
            by_chain[row["chain_id"]].append(row)
    return {chain_id: traces.stored_chain(rows, chain_id) for chain_id, rows in by_chain.items()}


def _chain_key(chain: traces.Chain) -> str:
    h = hashlib.blake2b(digest_size=16)
    for r in chain.rows:
        h.update(
            f"{r['artifact_id']}\0{r['status']}\0{r['content_hash']}\0{r.get('specification')}\n".encode(
                "utf-8", "surrogatepass"
            )
        )
    return h.hexdigest()


def _why_skipped(chain: traces.Chain) -> str | None:
    if chain.outcome == traces.OPEN:
        return SKIP_OPEN
    if not chain.specification.strip():
        return SKIP_EMPTY_SPEC
    return None


def skipped_counts(conn) -> dict[str, int]:
    """Chains that are not examples, by reason, over the whole buffer."""
    rows = conn.execute(
        f"SELECT CASE WHEN outcome = 'open' THEN '{SKIP_OPEN}' ELSE '{SKIP_EMPTY_SPEC}' END, count(*) "
        f"FROM chains WHERE {UNUSABLE_CHAINS} GROUP BY 1"
    ).fetchall()
    return dict(rows)


def counts(buffer: Buffer) -> dict[str, int]:
    """Headline counts for status displays: examples, train, heldout, duplicates."""
    return totals(buffer.conn)


def totals(conn) -> dict[str, int]:
    out = {"examples": 0, "train": 0, "heldout": 0, "duplicates": 0}
    for split_name, dup, n in conn.execute(
        "SELECT split, duplicate_of IS NOT NULL, count(*) FROM examples GROUP BY 1, 2"
    ):
        out["examples"] += n
        if dup:
            out["duplicates"] += n
        else:
            out[split_name] += n
    return out


def refresh(buffer: Buffer, selection: SelectionSettings, now: float | None = None) -> RefreshReport:
    """Bring the examples table up to date with the chains (idempotent, one transaction).

    Args:
        selection: the [selection] section: heldout_fraction, heldout_min_tasks,
            heldout_per_family, family_key, seed, dedup_similarity and max_text_chars are used
            here; the policy values are remembered for :func:`count_new`.
        now: the time recorded on changed rows (a parameter for tests).
    """
    now = _epoch(now)
    fraction, seed, threshold = selection.heldout_fraction, selection.seed, selection.dedup_similarity
    bands, rows_per_band = dedup.lsh_params(threshold)
    report = RefreshReport()
    with buffer.transaction() as conn:
        lsh = f"{threshold}:{bands}x{rows_per_band}"
        previous = _state(conn, "lsh")
        rebuild = previous is not None and previous != lsh  # dedup_similarity changed
        if previous != lsh:
            _set_state(conn, "lsh", lsh)
        _set_state(conn, "selection", json.dumps({k: getattr(selection, k) for k in _POLICY_KEYS}))
        seen = float(_state(conn, "chains_seen", "-1"))
        changed = conn.execute(
            "SELECT chain_id, source, workflow_id, action_pair_id, updated_at FROM chains WHERE updated_at >= ?",
            (seen,),
        ).fetchall()
        groups = {(s, w, a) for _, s, w, a, _ in changed}
        # Chains that relinking replaced: their examples go.
        touched: list[int] = []
        for s, w, a in groups:
            gone = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM examples WHERE source = ? AND workflow_id = ? AND action_pair_id = ? "
                    "AND chain_id NOT IN (SELECT chain_id FROM chains WHERE source = ? AND workflow_id = ? "
                    "AND action_pair_id = ?)",
                    (s, w, a, s, w, a),
                )
            ]
            for example_id in gone:
                touched.extend(_forget(conn, example_id))
            report.removed += len(gone)

        existing: dict[str, tuple[int, str]] = {}  # chain_id -> (example id, chain_key)
        ids = [c[0] for c in changed]
        for i in range(0, len(ids), 5000):
            existing.update(
                (r[0], (r[1], r[2]))
                for r in conn.execute(
                    "SELECT chain_id, id, chain_key FROM examples WHERE chain_id IN (SELECT value FROM json_each(?))",
                    (json.dumps(ids[i : i + 5000]),),
                )
            )
        next_seq = int(_state(conn, "next_seq", "1"))
        # Chains are read REFRESH_CHUNK at a time, their texts cut (chains_of): what a refresh
        # holds does not grow with the number of changed chains or the size of their artifacts.
        # Of a new or changed chain only its example row (a few hundred bytes) is kept until
        # every chunk is read, because sides are assigned in arrival order over all of them.
        fresh: list[tuple[dict, tuple | None, tuple[float, str], str]] = []  # row, old, arrival, family
        for c0 in range(0, len(ids), REFRESH_CHUNK):
            chunk = ids[c0 : c0 + REFRESH_CHUNK]
            chains = chains_of(conn, chunk, selection.max_text_chars)
            for chain_id in chunk:
                chain = chains.get(chain_id)
                old = existing.get(chain_id)
                if chain is None or _why_skipped(chain):
                    if old:
                        touched.extend(_forget(conn, old[0]))
                        report.removed += 1
                    continue
                key = _chain_key(chain)
                if old and old[1] == key:
                    report.unchanged += 1
                    continue
                row = _example_row(chain, key, now)
                fresh.append(
                    (
                        row,
                        old,
                        (traces.facts(chain)["created_ts"] or 0.0, row["task_key"]),
                        family_of(chain, selection.family_key),
                    )
                )
        tasks: dict[str, str] = {}
        for _, _, arrival, family in sorted(fresh, key=lambda f: f[2]):
            tasks.setdefault(arrival[1], family)
        sides = split.assign(
            conn, tasks, fraction, seed, min_tasks=selection.heldout_min_tasks, per_family=selection.heldout_per_family
        )
        band_rows: list[tuple[int, int, int]] = []
        for row, old, _, _ in fresh:
            row["split"] = sides[row["task_key"]]
            if old:
                touched.extend(_release(conn, old[0]))
                conn.execute("DELETE FROM example_bands WHERE example_id = ?", (old[0],))
                cols = ", ".join(f"{k} = ?" for k in row)
                conn.execute(
                    f"UPDATE examples SET {cols}, seq = ?, duplicate_of = NULL, duplicate = NULL WHERE id = ?",
                    (*row.values(), next_seq, old[0]),
                )
                example_id = old[0]
                report.updated += 1
            else:
                cols = ", ".join(row)
                example_id = conn.execute(
                    f"INSERT INTO examples ({cols}, seq) VALUES ({', '.join('?' for _ in row)}, ?)",
                    (*row.values(), next_seq),
                ).lastrowid
                report.added += 1
            next_seq += 1
            band_rows.extend(
                (b, k, example_id) for b, k in enumerate(dedup.band_keys(row["minhash"], bands, rows_per_band))
            )
            touched.append(example_id)
        conn.executemany("INSERT OR IGNORE INTO example_bands (band, key, example_id) VALUES (?, ?, ?)", band_rows)
        _set_state(conn, "next_seq", str(next_seq))
        if rebuild:
            touched = _rebuild_bands(conn, bands, rows_per_band)
        _deduplicate(conn, touched, threshold, report)
        if changed:
            _set_state(conn, "chains_seen", repr(max(c[4] for c in changed)))
        report.skipped = skipped_counts(conn)
        report.totals = totals(conn)
    return report


def family_of(chain: traces.Chain, family_key: str = "") -> str:
    """The chain's family: its artifacts' metadata value under ``family_key`` (the first that has
    one), else its action pair."""
    if family_key:
        for row in chain.rows:
            try:
                value = json.loads(row.get("metadata") or "{}").get(family_key)
            except (ValueError, AttributeError):
                continue
            if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value):
                return str(value)
    return chain.action_pair_id or ""


def _example_row(chain: traces.Chain, chain_key: str, now: float) -> dict:
    """The chain's row of ``examples``, but for its ``split`` (assigned once all are read)."""
    fact = traces.facts(chain)
    target = traces.target(chain)
    if target is None:
        raise ValueError(f"chain {chain.chain_id} has no attempts")
    answer = target["content"]
    kind = fact["outcome"]
    text = dedup.text_of(chain.specification, answer)
    task = split.task_key(chain.specification)
    return {
        "chain_id": chain.chain_id,
        "source": chain.source,
        "workflow_id": chain.workflow_id,
        "action_pair_id": chain.action_pair_id,
        "outcome": fact["outcome"],
        "retries": fact["retries"],
        "attempts": len(chain.rows),
        "origin": fact["origin"],
        "generated_only": fact["generated_only"],
        "created_ts": fact["created_ts"],
        "task_key": task,
        "answer_key": dedup.exact_key(answer, "answer"),
        "text_key": dedup.exact_key(text, kind),
        "chain_key": chain_key,
        "minhash": dedup.signature(text),
        "updated_at": now,
    }


def _release(conn, example_id: int) -> list[int]:
    """Un-drop the examples that were duplicates of this one (it is changing or going)."""
    ids = [r[0] for r in conn.execute("SELECT id FROM examples WHERE duplicate_of = ?", (example_id,))]
    conn.execute("UPDATE examples SET duplicate_of = NULL, duplicate = NULL WHERE duplicate_of = ?", (example_id,))
    return ids


def _forget(conn, example_id: int) -> list[int]:
    """Delete one example; returns the examples that were its duplicates (now to re-check)."""
    released = _release(conn, example_id)
    conn.execute("DELETE FROM example_bands WHERE example_id = ?", (example_id,))
    conn.execute("DELETE FROM examples WHERE id = ?", (example_id,))
    return released


def _rebuild_bands(conn, bands: int, rows_per_band: int) -> list[int]:
    """New LSH parameters (another dedup_similarity): re-band and re-check every example."""
    conn.execute("DELETE FROM example_bands")
    conn.execute("UPDATE examples SET duplicate_of = NULL, duplicate = NULL")
    ids = []
    for example_id, sig in conn.execute("SELECT id, minhash FROM examples").fetchall():
        conn.executemany(
            "INSERT OR IGNORE INTO example_bands (band, key, example_id) VALUES (?, ?, ?)",
            [(b, k, example_id) for b, k in enumerate(dedup.band_keys(sig, bands, rows_per_band))],
        )
        ids.append(example_id)
    return ids


def _deduplicate(conn, touched: list[int], threshold: float, report: RefreshReport) -> None:
    """Check the touched examples, newest first, against the kept ones (see dedup.dedup)."""
    if not touched:
        return
    info = {}
    for i in range(0, len(touched), 5000):
        for r in conn.execute(
            "SELECT id, created_ts, seq, text_key, outcome, minhash FROM examples "
            "WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(touched[i : i + 5000]),),
        ):
            info[r[0]] = r
    dropped: set[int] = set()
    for x in sorted(info.values(), key=lambda r: (r[1], r[2]), reverse=True):
        x_id, x_ts, x_seq, x_text, x_outcome, x_sig = x
        if x_id in dropped:
            continue  # a newer example already dropped it in this pass
        # Identical texts have identical signatures, so every exact duplicate is a candidate too.
        candidates = conn.execute(
            "SELECT e.id, e.created_ts, e.seq, e.minhash, e.text_key FROM examples e WHERE e.id IN ("
            "  SELECT b2.example_id FROM example_bands b1 JOIN example_bands b2 "
            "  ON b2.band = b1.band AND b2.key = b1.key WHERE b1.example_id = ?) "
            "AND e.id != ? AND e.duplicate_of IS NULL AND e.outcome = ?",
            (x_id, x_id, x_outcome),
        ).fetchall()
        scores = dedup.similarities(x_sig, [c[3] for c in candidates])
        similar: dict[int, tuple] = {}  # id -> (order, how)
        for (y_id, y_ts, y_seq, _, y_text), score in zip(candidates, scores, strict=True):
            if y_text == x_text:
                similar[y_id] = ((y_ts, y_seq), "exact")
            elif score >= threshold:
                similar[y_id] = ((y_ts, y_seq), "near")
        if not similar:
            continue
        newer = [(order, y, how) for y, (order, how) in similar.items() if order > (x_ts, x_seq)]
        if newer:
            _, keeper, how = max(newer)
            _drop(conn, x_id, keeper, how, report)
            dropped.add(x_id)
        else:
            for y, (_, how) in similar.items():
                _drop(conn, y, x_id, how, report)
                dropped.add(y)


def _drop(conn, example_id: int, keeper: int, how: str, report: RefreshReport) -> None:
    conn.execute("UPDATE examples SET duplicate_of = ?, duplicate = ? WHERE id = ?", (keeper, how, example_id))
    conn.execute("UPDATE examples SET duplicate_of = ? WHERE duplicate_of = ?", (keeper, example_id))
    report.duplicates[how] += 1


# -- reading -------------------------------------------------------------------------------------

_METHOD_OUTCOMES = {"sft": SUCCESSES, "dpo": ("refined",), "kto": ("first_try", "refined", "exhausted")}


def _pool_where(
    policy: traces.Policy, ctx: traces.PolicyContext, split_name: str, outcomes: tuple[str, ...]
) -> tuple[str, list]:
    sql, params = policy.where(ctx)
    marks = ", ".join("?" for _ in outcomes)
    return (
        f"split = ? AND duplicate_of IS NULL AND outcome IN ({marks}) AND ({sql})",
        [split_name, *outcomes, *params],
    )


def count_new(
    buffer: Buffer, since_seq: int, selection: SelectionSettings | None = None, now: float | None = None
) -> int:
    """Training examples (train split, not duplicates, selected by the policy) with seq > since_seq.

    Args:
        selection: the [selection] section; by default the policy values the last
            :func:`refresh` was given (the built-in ones before any refresh).
    """
    if selection is None:
        stored = _state(buffer.conn, "selection")
        selection = SelectionSettings(**json.loads(stored)) if stored else SelectionSettings()
    policy, ctx = policy_and_context(selection, now)
    where, params = _pool_where(policy, ctx, split.TRAIN, SUCCESSES + ("exhausted",))
    return buffer.conn.execute(
        f"SELECT count(*) FROM examples WHERE seq > ? AND {where}", (since_seq, *params)
    ).fetchone()[0]


@dataclass
class Snapshot:
    train: list[dict]
    heldout: list[dict]
    example_seqs: list[int]
    max_seq: int
    stats: dict


def row_metadata(
    chain: traces.Chain,
    seq: int,
    split_name: str,
    row: dict | None = None,
    conditioning: str = formatting.FIRST_ATTEMPT,
) -> dict:
    """The ``metadata`` every exported row carries (training, held-out and GRPO prompt rows
    alike): where the chain came from, its outcome and the artifact the row was made of."""
    return {
        "chain_id": chain.chain_id,
        "seq": seq,
        "split": split_name,
        "source": chain.source,
        "workflow_id": chain.workflow_id,
        "action_pair_id": chain.action_pair_id,
        "outcome": chain.outcome,
        "retries": chain.retries,
        "artifact_ids": [r["artifact_id"] for r in chain.rows],
        "accepted_id": chain.accepted["artifact_id"] if chain.accepted else None,
        "artifact_id": (row or chain.accepted or {}).get("artifact_id"),
        "conditioning": conditioning,
        "task_key": split.task_key(chain.specification),
    }


def method_rows(
    chain: traces.Chain,
    method: str,
    seq: int,
    split_name: str,
    *,
    max_history: int,
    max_artifact_chars: int,
    template: formatting.Template,
    conditioning: str,
) -> list[dict]:
    """One chain as training rows in the method's conversational format (see docs/architecture.md).

    ``conditioning`` ([selection] conditioning) chooses SFT's prompts: a refinement gives a
    first-attempt row, a history row or both (:func:`formatting.conditionings`); DPO and KTO
    always use the first-attempt prompt.
    """
    if method == "sft":
        if chain.accepted is None:
            return []
        return [
            {
                "prompt": formatting.prompt(
                    chain,
                    history=kind == formatting.HISTORY,
                    max_history=max_history,
                    max_artifact_chars=max_artifact_chars,
                    template=template,
                ),
                "completion": formatting.answer(chain.accepted, template),
                "metadata": row_metadata(chain, seq, split_name, conditioning=kind),
            }
            for kind in formatting.conditionings(chain, conditioning, max_history)
        ]
    if method == "dpo":
        return [
            {"prompt": p, "chosen": c, "rejected": r, "metadata": row_metadata(chain, seq, split_name, row)}
            for p, c, r, row in formatting.dpo_pairs(chain, template=template)
        ]
    if method == "kto":
        return [
            {"prompt": p, "completion": c, "label": label, "metadata": row_metadata(chain, seq, split_name, row)}
            for p, c, label, row in formatting.kto_rows(chain, template=template)
        ]
    raise ValueError(f"unknown method {method!r}; expected sft, dpo or kto")


def heldout_row(chain: traces.Chain, seq: int, template: formatting.Template = formatting.Template()) -> dict:
    """A held-out task: the first-attempt prompt and, when the chain was accepted, its answer
    (an exhausted chain's ``completion`` is None: generated for and guarded, not scored for loss)."""
    return {
        "prompt": formatting.prompt(chain, history=False, template=template),
        "completion": formatting.answer(chain.accepted, template) if chain.accepted else None,
        "specification": chain.specification,
        "chain_id": chain.chain_id,
        "task_key": split.task_key(chain.specification),
        "metadata": row_metadata(chain, seq, split.HELDOUT),
    }


def heldout_tasks(
    conn, max_heldout: int | None = None, action_pairs: tuple[str, ...] = (), per_family: int = 0
) -> list[tuple[int, str]]:
    """(seq, chain_id) of one chain per held-out task, the oldest tasks first.

    Every held-out task counts, whatever the filter policy and the chain's outcome (first-try,
    refined, exhausted): the guard can judge any first attempt, and ε is measured over the
    tasks the generator meets. A task's chain is its oldest accepted one (its answer is what
    the loss is scored on), else its oldest chain. Tasks are ordered by their first chain's
    time, so a cap keeps the same tasks while the buffer grows; under a cap, each family's
    ``per_family`` oldest tasks come first, so a family that arrives late is still scored.
    """
    where, params = "split = ?", [split.HELDOUT]
    if action_pairs:
        where += f" AND action_pair_id IN ({', '.join('?' for _ in action_pairs)})"
        params += list(action_pairs)
    limit = "" if max_heldout is None else f" LIMIT {int(max_heldout)}"
    tasks = [
        r[0]
        for r in conn.execute(
            f"SELECT task_key FROM (SELECT e.task_key, min(e.created_ts) AS ts, s.family FROM examples e "
            f"LEFT JOIN splits s USING (task_key) WHERE e.{where} GROUP BY e.task_key) "
            f"ORDER BY (row_number() OVER (PARTITION BY family ORDER BY ts, task_key) > ?), ts, task_key{limit}",
            (*params, per_family),
        )
    ]
    best: dict[str, tuple] = {}
    for i in range(0, len(tasks), 5000):
        for key, seq, chain_id, outcome, ts in conn.execute(
            f"SELECT task_key, seq, chain_id, outcome, created_ts FROM examples WHERE {where} "
            "AND task_key IN (SELECT value FROM json_each(?))",
            (*params, json.dumps(tasks[i : i + 5000])),
        ):
            rank = (outcome not in SUCCESSES, ts, seq)
            if key not in best or rank < best[key][0]:
                best[key] = (rank, seq, chain_id)
    return [(best[k][1], best[k][2]) for k in tasks if k in best]


def build_snapshot(
    buffer: Buffer,
    selection: SelectionSettings,
    *,
    method: str,
    n: int,
    replay_ratio: float,
    since_seq: int = 0,
    max_heldout: int | None = None,
    now: float | None = None,
) -> Snapshot:
    """One training set and the held-out set, from the examples table as it is now.

    Args:
        selection: the [selection] section (policy, min_retries, recent_days, action_pairs,
            max_history, max_artifact_chars, prompt_template, prompt_format, system_message, seed,
            replay_weighting, and
            conditioning: SFT's prompts, the first attempt, the history or both).
        method: "sft" (prompt -> accepted), "dpo" (pairs) or "kto" (unpaired).
        n: examples (chains) to draw: new ones first, plus the replayed share.
        replay_ratio: share of the set drawn from examples with seq <= since_seq.
        since_seq: the max_seq of the snapshot the serving version was trained on (0: none).
        max_heldout: at most this many held-out tasks (the oldest, so the set stays put); see
            :func:`heldout_tasks`.

    Raises:
        formatting.TemplateError: the configured prompt template cannot be used.
    """
    if method not in _METHOD_OUTCOMES:
        raise ValueError(f"unknown method {method!r}; expected sft, dpo or kto")
    policy, ctx = policy_and_context(selection, now)
    template = formatting.template_of(selection)
    max_history, max_chars = selection.max_history, selection.max_artifact_chars
    conn = buffer.conn
    where, params = _pool_where(policy, ctx, split.TRAIN, _METHOD_OUTCOMES[method])
    max_seq = conn.execute("SELECT max(seq) FROM examples WHERE split = 'train'").fetchone()[0] or 0

    def probe(seqs: list[int]) -> dict[int, int]:
        return dict(
            conn.execute(
                f"SELECT seq, retries FROM examples WHERE seq IN (SELECT value FROM json_each(?)) AND {where}",
                (json.dumps(seqs), *params),
            )
        )

    def scan(lo: int, hi: int) -> list[tuple[int, int]]:
        return conn.execute(
            f"SELECT seq, retries FROM examples WHERE seq > ? AND seq <= ? AND {where}", (lo, hi, *params)
        ).fetchall()

    rng = random.Random(selection.seed)
    since = min(since_seq, max_seq)
    n_new_target = n if since <= 0 else sampling.split_sizes(n, replay_ratio, n)[0]
    new = sampling.draw(n_new_target, since, max_seq, probe, scan, rng)
    _, n_replay = sampling.split_sizes(n, replay_ratio, len(new))
    top = conn.execute("SELECT max(retries) FROM examples").fetchone()[0] or 0
    old = sampling.draw(n_replay, 0, since, probe, scan, rng, selection.replay_weighting, top) if since > 0 else []
    seqs = new + old
    by_seq = dict(
        conn.execute(
            "SELECT seq, chain_id FROM examples WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(seqs),)
        ).fetchall()
    )
    chains = chains_of(conn, by_seq.values(), selection.max_text_chars)
    train = []
    for s in seqs:
        chain = chains.get(by_seq.get(s, ""))
        if chain is not None:  # None only if its artifacts vanished under us
            train.extend(
                method_rows(
                    chain,
                    method,
                    s,
                    split.TRAIN,
                    max_history=max_history,
                    max_artifact_chars=max_chars,
                    template=template,
                    conditioning=selection.conditioning,
                )
            )
    rng.shuffle(train)

    held = heldout_tasks(conn, max_heldout, tuple(selection.action_pairs), selection.heldout_per_family)
    held_chains = chains_of(conn, [c for _, c in held], selection.max_text_chars)
    heldout = [heldout_row(held_chains[c], s, template) for s, c in held if c in held_chains]

    stats = {
        "new": len(new),
        "replayed": len(old),
        "rows": len(train),
        "heldout": len(heldout),
        "heldout_answered": sum(1 for r in heldout if r["completion"]),
        "heldout_outcomes": dict(Counter(r["metadata"]["outcome"] for r in heldout)),
        "skipped": skipped_counts(conn),
        "duplicates": dict(
            conn.execute("SELECT duplicate, count(*) FROM examples WHERE duplicate_of > 0 GROUP BY 1").fetchall()
        ),
        "contaminated": len(split.contamination(conn, [r["chain_id"] for r in heldout])),
        "policy": policy.text,
        "method": method,
        "conditioning": selection.conditioning,
    }
    return Snapshot(train=train, heldout=heldout, example_seqs=sorted(seqs), max_seq=max_seq, stats=stats)
