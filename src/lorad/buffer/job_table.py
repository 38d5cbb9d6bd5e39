"""Training jobs as the buffer records them: the ``jobs`` and ``job_events`` tables.

States: queued → preparing → training → evaluating → promoted | rejected, or failed |
cancelled | paused | skipped (nothing to train on). A paused job (window end, shutdown) keeps
its job directory and checkpoints; resuming runs the worker again on the same directory.
Every transition is a ``job_events`` row. The daemon's jobs and ``lorad train``'s are kept
alike (trigger ``window``, ``manual`` or ``cli``); :mod:`lorad.cycle` moves them along.
Also ``daemon_state``: small daemon state that must survive restarts (``scheduling_paused``,
``failures``, ``backoff_until``, and one ``gpu_share:<url>`` record per vLLM server put to sleep).
"""

from __future__ import annotations

import builtins
import json
import secrets
import sqlite3
import time
from datetime import datetime, timezone

from lorad.buffer.schema import JOB_STATES, JOB_TRIGGERS

STATES = JOB_STATES
TRIGGERS = JOB_TRIGGERS
ACTIVE = ("preparing", "training", "evaluating")
FINAL = ("promoted", "rejected", "failed", "cancelled", "skipped")


class JobNotFound(Exception):
    "No job has that id."


def new_job_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(now or time.time(), timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"job-{stamp}-{secrets.token_hex(2)}"


_SQLITE_MAX_INT = 2**63 - 1
_COLUMNS = (
    "job_id",
    "state",
    "trigger",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "runs",
    "job_dir",
    "version",
    "reason",
    "progress",
)


def _row(values) -> dict:
    job = dict(zip(_COLUMNS, values, strict=True))
    job["progress"] = json.loads(job["progress"]) if job["progress"] else None
    return job


class JobStore:
    """The jobs table, over one SQLite connection (a Buffer's ``conn``)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def _write(self, sql: str, params: tuple) -> int:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            n = self.conn.execute(sql, params).rowcount
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return n

    def create(self, trigger: str, now: float | None = None) -> dict:
        now = now or time.time()
        job_id = new_job_id(now)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "INSERT INTO jobs (job_id, state, trigger, created_at, updated_at) VALUES (?, 'queued', ?, ?, ?)",
                (job_id, trigger, now, now),
            )
            self.conn.execute(
                "INSERT INTO job_events (job_id, ts, state, reason) VALUES (?, ?, 'queued', ?)", (job_id, now, trigger)
            )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return self.get(job_id)

    def transition(self, job_id: str, state: str, reason: str | None = None, **fields) -> None:
        """Move a job to ``state`` (recorded in job_events), setting any other columns given."""
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        sets = {"state": state, "updated_at": now, **fields}
        if reason is not None:
            sets["reason"] = reason
        if state in FINAL:
            sets["finished_at"] = now
        if "progress" in sets and not isinstance(sets["progress"], (str, type(None))):
            sets["progress"] = json.dumps(sets["progress"])
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in sets)} WHERE job_id = ?", (*sets.values(), job_id)
            )
            self.conn.execute(
                "INSERT INTO job_events (job_id, ts, state, reason) VALUES (?, ?, ?, ?)", (job_id, now, state, reason)
            )
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def get(self, job_id: str) -> dict:
        row = self.conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _row(row)

    def list(self, limit: int = 50, states: tuple[str, ...] = ()) -> list[dict]:
        """The newest ``limit`` jobs (a limit past SQLite's integers: all of them)."""
        limit = min(limit, _SQLITE_MAX_INT)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        params: tuple = ()
        if states:
            sql += f" WHERE state IN ({', '.join('?' for _ in states)})"
            params = tuple(states)
        sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        return [_row(r) for r in self.conn.execute(sql, (*params, limit))]

    def events(self, job_id: str) -> builtins.list[dict]:  # (list: the method above)
        rows = self.conn.execute("SELECT ts, state, reason FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))
        return [{"ts": ts, "state": s, "reason": r} for ts, s, r in rows]

    def waiting(self) -> tuple[builtins.list[dict], builtins.list[dict]]:
        """(queued, paused) jobs, oldest first."""
        rows = self.list(limit=1000, states=("queued", "paused"))[::-1]
        return [j for j in rows if j["state"] == "queued"], [j for j in rows if j["state"] == "paused"]

    def get_state(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM daemon_state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_state(self, key: str, value) -> None:
        self._write(
            "INSERT INTO daemon_state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def delete_state(self, key: str) -> None:
        self._write("DELETE FROM daemon_state WHERE key = ?", (key,))

    def states(self, prefix: str) -> dict:
        """Every daemon_state entry whose key starts with ``prefix``: {key: value}."""
        rows = self.conn.execute(
            "SELECT key, value FROM daemon_state WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
        )
        return {k: json.loads(v) for k, v in rows}
