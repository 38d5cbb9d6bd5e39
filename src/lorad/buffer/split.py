"""The held-out split: by task, deterministic, frozen once assigned.

A task is its normalised specification, so every chain of one task, in any workflow, sits on
the same side. The side comes from a hash of the task and the seed (reproducible on any
machine, independent of the order examples arrive in); once a task has a side it is stored
in the ``splits`` table and never recomputed, so changing ``heldout_fraction`` or growing the
buffer never moves an example across.
"""

from __future__ import annotations

import hashlib
import json

from lorad.buffer.dedup import normalise

TRAIN = "train"
HELDOUT = "heldout"


def task_key(specification: str) -> str:
    """The identity of a task: a hash of its normalised specification."""
    return hashlib.blake2b(normalise(specification).encode("utf-8", "surrogatepass"),
                           digest_size=16).hexdigest()


def side(key: str, fraction: float, seed: int = 0) -> str:
    """Which side a task falls on, from its key alone (pure)."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return HELDOUT if int.from_bytes(digest, "big") / 2**64 < fraction else TRAIN


def assign(conn, keys: set[str], fraction: float, seed: int = 0) -> dict[str, str]:
    """The frozen side of each task key, assigning (and storing) those not seen before.

    Runs inside the caller's transaction.
    """
    out: dict[str, str] = {}
    keys = list(keys)
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        out.update(conn.execute(
            f"SELECT task_key, split FROM splits WHERE task_key IN ({', '.join('?' for _ in chunk)})",
            chunk).fetchall())
    fresh = [(k, side(k, fraction, seed)) for k in keys if k not in out]
    conn.executemany("INSERT INTO splits (task_key, split) VALUES (?, ?)", fresh)
    out.update(fresh)
    return out


def contamination(conn, chain_ids: list[str] | None = None) -> list[dict]:
    """Held-out examples whose task or exact answer also appears in the training split.

    Args:
        chain_ids: check only these held-out examples (default: all of them).

    Returns one entry per contaminated held-out example: its chain id, a cut of its
    specification and what leaked ("specification" or "answer").
    """
    only, params = "", []
    if chain_ids is not None:
        only, params = " AND h.chain_id IN (SELECT value FROM json_each(?))", [json.dumps(list(chain_ids))]
    spec = "(SELECT substr(c.specification, 1, 80) FROM chains c WHERE c.chain_id = h.chain_id)"
    rows = conn.execute(
        f"SELECT h.chain_id, {spec}, 'specification' FROM examples h "
        f"WHERE h.split = 'heldout'{only} AND EXISTS (SELECT 1 FROM examples t WHERE t.task_key = h.task_key "
        "AND t.split = 'train') "
        "UNION ALL "
        f"SELECT h.chain_id, {spec}, 'answer' FROM examples h "
        f"WHERE h.split = 'heldout'{only} AND h.outcome != 'exhausted' AND EXISTS (SELECT 1 FROM examples t "
        "WHERE t.answer_key = h.answer_key AND t.split = 'train' AND t.outcome != 'exhausted')",
        params * 2).fetchall()
    return [{"chain_id": c, "specification": s, "leak": what} for c, s, what in rows]
