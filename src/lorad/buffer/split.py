"""The held-out split: by task, deterministic, frozen once assigned.

A task is its normalised specification, so every chain of one task, in any workflow, sits on
the same side. Once a task has a side it is stored in the ``splits`` table (with its family)
and never recomputed, so changing ``heldout_fraction`` or growing the buffer never moves an
example across.

A new task's side (:func:`choose`): while the held-out set is under its floor
(``heldout_min_tasks``), or the task's family has fewer than ``heldout_per_family`` held-out
tasks, the task is held out, as long as its set (the whole buffer's, or its family's) would not
hold more held-out tasks than trained ones; past the floor, a hash of the task and the seed
decides with probability ``heldout_fraction`` (reproducible on any machine). Why a floor: at
15 %, a first store of 60 tasks holds out 9, and on 9 tasks no change of first-attempt
acceptance is significant, so the first cycles promoted on the loss alone; and a family that
appears later (the traffic moving on) would wait for chance to be measured at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from lorad.buffer.dedup import normalise

TRAIN = "train"
HELDOUT = "heldout"


def task_key(specification: str) -> str:
    """The identity of a task: a hash of its normalised specification."""
    return hashlib.blake2b(normalise(specification).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def side(key: str, fraction: float, seed: int = 0) -> str:
    """Which side a task falls on, from its key alone (pure)."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return HELDOUT if int.from_bytes(digest, "big") / 2**64 < fraction else TRAIN


def choose(
    key: str,
    held: int,
    trained: int,
    family_held: int,
    family_trained: int,
    *,
    fraction: float,
    seed: int = 0,
    min_tasks: int = 0,
    per_family: int = 0,
) -> str:
    """A new task's side, given how many tasks each side holds already (pure).

    Args:
        held, trained: tasks on each side in the whole buffer.
        family_held, family_trained: the same within the task's family.
    """
    if family_held < per_family and family_held <= family_trained:
        return HELDOUT
    if held < min_tasks and held <= trained:
        return HELDOUT
    return side(key, fraction, seed)


def assign(
    conn, tasks: Mapping[str, str | None], fraction: float, seed: int = 0, *, min_tasks: int = 0, per_family: int = 0
) -> dict[str, str]:
    """The frozen side of each task key, assigning (and storing) those not seen before.

    Args:
        tasks: task key -> its family, new tasks in the order they arrived (oldest first).

    Runs inside the caller's transaction.
    """
    out: dict[str, str] = {}
    keys = list(tasks)
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        out.update(
            conn.execute(
                f"SELECT task_key, split FROM splits WHERE task_key IN ({', '.join('?' for _ in chunk)})", chunk
            ).fetchall()
        )
    fresh = [k for k in keys if k not in out]
    if not fresh:
        return out
    totals = {TRAIN: 0, HELDOUT: 0}
    families: dict[tuple[str | None, str], int] = {}
    for side_, family, n in conn.execute("SELECT split, family, count(*) FROM splits GROUP BY 1, 2"):
        totals[side_] = totals.get(side_, 0) + n
        families[(family, side_)] = n
    rows = []
    for key in fresh:
        family = tasks[key]
        chosen = choose(
            key,
            totals[HELDOUT],
            totals[TRAIN],
            families.get((family, HELDOUT), 0),
            families.get((family, TRAIN), 0),
            fraction=fraction,
            seed=seed,
            min_tasks=min_tasks,
            per_family=per_family,
        )
        totals[chosen] += 1
        families[(family, chosen)] = families.get((family, chosen), 0) + 1
        rows.append((key, chosen, family))
        out[key] = chosen
    conn.executemany("INSERT INTO splits (task_key, split, family) VALUES (?, ?, ?)", rows)
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
        params * 2,
    ).fetchall()
    return [{"chain_id": c, "specification": s, "leak": what} for c, s, what in rows]
