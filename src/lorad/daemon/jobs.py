"""Training jobs: their lifecycle, persisted in the buffer, and the thread that runs one.

States: queued → preparing → training → evaluating → promoted | rejected, or failed |
cancelled | paused. A paused job (window end, shutdown) keeps its job directory and
checkpoints; resuming it runs the worker again on the same directory. The daemon runs one job
at a time through :mod:`lorad.cycle` (prepare the job directory, run the worker subprocess,
conclude: gate, registry, publish hooks); this module only keeps the books and the thread.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils
import structlog

from lorad.buffer.store import migration

log = structlog.get_logger()

STATES = ("queued", "preparing", "training", "evaluating", "promoted", "rejected", "failed",
          "cancelled", "paused")
ACTIVE = ("preparing", "training", "evaluating")
FINAL = ("promoted", "rejected", "failed", "cancelled")
TRIGGERS = ("window", "manual")


class JobNotFound(Exception):
    "No job has that id."


class JobStateError(Exception):
    "The job is not in a state that allows this."


@migration("0004_jobs")
def _jobs(db: sqlite_utils.Database) -> None:
    db.execute(
        f"""
        CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
            trigger TEXT NOT NULL CHECK (trigger IN ('window', 'manual')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            runs INTEGER NOT NULL DEFAULT 0,
            job_dir TEXT,
            version TEXT,
            reason TEXT,
            progress TEXT
        )
        """
    )
    db.execute("CREATE INDEX jobs_state ON jobs (state, created_at)")
    db.execute(
        """
        CREATE TABLE job_events (
            id INTEGER PRIMARY KEY,
            job_id TEXT NOT NULL REFERENCES jobs (job_id),
            ts REAL NOT NULL,
            state TEXT NOT NULL,
            reason TEXT
        )
        """
    )
    db.execute("CREATE INDEX job_events_job ON job_events (job_id, id)")
    # Small daemon state that must survive restarts: scheduling paused, failure back-off.
    db.execute("CREATE TABLE daemon_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def stop_orphan_worker(job_dir: Path, timeout: float = 30.0) -> bool:
    """Stop a worker still running on ``job_dir`` (its pid in worker.pid); True if there was one.

    SIGTERM first (it checkpoints and exits paused), SIGKILL after ``timeout``. The pid is only
    signalled while its command line still names the job directory (pids are reused).
    """
    import os
    import signal

    try:
        pid = int((job_dir / "worker.pid").read_text())
    except (OSError, ValueError):
        return False

    def alive() -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return str(job_dir).encode() in cmdline

    if not alive():
        return False
    log.warning("orphan_worker_stopped", pid=pid, job_dir=str(job_dir))
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return True
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive():
            return True
    return True


def new_job_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(now or time.time(), timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"job-{stamp}-{secrets.token_hex(2)}"


_COLUMNS = ("job_id", "state", "trigger", "created_at", "updated_at", "started_at", "finished_at",
            "runs", "job_dir", "version", "reason", "progress")


def _row(values) -> dict:
    job = dict(zip(_COLUMNS, values))
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
                (job_id, trigger, now, now))
            self.conn.execute("INSERT INTO job_events (job_id, ts, state, reason) VALUES (?, ?, 'queued', ?)",
                              (job_id, now, trigger))
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
            self.conn.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in sets)} WHERE job_id = ?",
                              (*sets.values(), job_id))
            self.conn.execute("INSERT INTO job_events (job_id, ts, state, reason) VALUES (?, ?, ?, ?)",
                              (job_id, now, state, reason))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def update_progress(self, job_id: str, progress: dict) -> None:
        self._write("UPDATE jobs SET progress = ?, updated_at = ? WHERE job_id = ?",
                    (json.dumps(progress), time.time(), job_id))

    def get(self, job_id: str) -> dict:
        row = self.conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return _row(row)

    def list(self, limit: int = 50, states: tuple[str, ...] = ()) -> list[dict]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        params: tuple = ()
        if states:
            sql += f" WHERE state IN ({', '.join('?' for _ in states)})"
            params = tuple(states)
        sql += " ORDER BY created_at DESC, job_id DESC LIMIT ?"
        return [_row(r) for r in self.conn.execute(sql, (*params, limit))]

    def events(self, job_id: str) -> list[dict]:
        rows = self.conn.execute("SELECT ts, state, reason FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))
        return [{"ts": ts, "state": s, "reason": r} for ts, s, r in rows]

    def waiting(self) -> tuple[list[dict], list[dict]]:
        """(queued, paused) jobs, oldest first."""
        rows = self.list(limit=1000, states=("queued", "paused"))[::-1]
        return [j for j in rows if j["state"] == "queued"], [j for j in rows if j["state"] == "paused"]

    def recover(self) -> list[str]:
        """At start-up: jobs left active by a daemon that died become paused (resumable).

        A worker that outlived its daemon (started by hand, killed with SIGKILL) is stopped
        first, so a resumed job never has two workers writing one job directory.
        """
        stale = self.list(limit=1000, states=ACTIVE)
        for job in stale:
            if job["job_dir"]:
                stop_orphan_worker(Path(job["job_dir"]))
            self.transition(job["job_id"], "paused", "daemon restarted while the job was running")
        return [j["job_id"] for j in stale]

    def get_state(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM daemon_state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_state(self, key: str, value) -> None:
        self._write("INSERT INTO daemon_state (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, json.dumps(value)))


class JobRunner(threading.Thread):
    """Runs one job in a thread: prepare, worker subprocess, conclude (gate, registry, publish).

    The daemon's main loop reads :meth:`info` (memory only) and asks for :meth:`pause` or
    :meth:`cancel`; both stop the worker at its next step (it checkpoints first). The job
    thread has its own buffer connection, so its writes never hold up the daemon.

    Args:
        settings: the configuration the job runs with (fixed for the job's run).
        job: the job's row (queued, or paused to resume).
        window_end: Unix time at which the worker should checkpoint and pause (None = no limit).
    """

    def __init__(self, settings, job: dict, window_end: float | None = None,
                 on_concluded: Callable[[Any], None] | None = None):
        super().__init__(name=f"lorad-job-{job['job_id']}", daemon=True)
        # Called with the job thread's buffer once a version was promoted or rejected, before
        # the job's final state is recorded: whoever sees that state sees its effects in status.
        self.on_concluded = on_concluded
        self.settings = settings
        self.job = job
        self.job_id = job["job_id"]
        self.window_end = window_end
        self.state = "preparing" if not job.get("job_dir") else "training"
        self.progress: dict | None = job.get("progress")
        self.final_state: str | None = None
        self.reason: str | None = None
        self.version: str | None = None
        self.started = time.time()
        self._stop_event = threading.Event()
        self._mode = "pause"
        self._stop_reason = ""
        self._lock = threading.Lock()

    # -- from the main loop ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def info(self) -> dict:
        with self._lock:
            return {"job_id": self.job_id, "state": self.state, "trigger": self.job["trigger"],
                    "progress": dict(self.progress) if self.progress else None,
                    "started_at": self.started, "stopping": self._mode if self._stop_event.is_set() else None,
                    "window_end": self.window_end}

    def pause(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop_event.set()

    def cancel(self, reason: str) -> None:
        self._mode = "cancel"
        self._stop_reason = reason
        self._stop_event.set()

    def kill(self) -> None:
        """Last resort at shutdown: the worker did not stop in time."""
        from lorad import cycle

        job_dir = self._job_dir()
        if job_dir is not None:
            cycle.kill_worker(job_dir)

    # -- the job thread -------------------------------------------------------------------------

    def _job_dir(self) -> Path | None:
        return Path(self.job["job_dir"]) if self.job.get("job_dir") else None

    def _set(self, store: "JobStore", state: str, reason: str | None = None, **fields) -> None:
        store.transition(self.job_id, state, reason, **fields)  # the record first, then memory
        with self._lock:
            self.state = state
        log.info("job_state_changed", job_id=self.job_id, state=state, reason=reason)

    def _on_progress(self, record: dict) -> None:
        with self._lock:
            self.progress = record
            stage = record.get("stage")
        if stage in ("evaluate", "evaluating", "evaluation") and self.state == "training":
            with self._lock:
                self.state = "evaluating"

    def run(self) -> None:
        from lorad import cycle
        from lorad.buffer.store import Buffer
        from lorad.training.job import EXIT_CANCELLED, EXIT_OK, EXIT_PAUSED, read_result

        s = self.settings
        buffer = Buffer(s.buffer_path, s.buffer.synchronous)
        store = JobStore(buffer.conn)
        registry = cycle.open_registry(s, buffer)
        held = contextlib.ExitStack()
        try:
            # TrainingBusy (a `lorad train --once` is running) fails the job: the daemon backs off
            held.enter_context(cycle.training_lock(s, f"the daemon, job {self.job_id}"))
            job_dir = self._job_dir()
            if job_dir is None or not job_dir.is_dir():
                self._set(store, "preparing", None, started_at=time.time())
                live = cycle.check_live(s, buffer, registry)
                if live and live.get("rolled_back"):
                    log.warning("adapter_rolled_back", job_id=self.job_id, reasons=live.get("reasons"))
                job_dir = Path(cycle.prepare(s, buffer, registry, self.job_id, window_end=self.window_end))
                self.job["job_dir"] = str(job_dir)
            else:
                cycle.set_window_end(job_dir, self.window_end)
            if self._stop_event.is_set():
                return self._finish(store, self._stopped_state(), self._stop_reason, job_dir=str(job_dir))
            self._set(store, "training", None, job_dir=str(job_dir), runs=self.job.get("runs", 0) + 1)
            code = cycle.run_worker(job_dir, on_progress=self._on_progress, stop_event=self._stop_event,
                                    cancel=lambda: self._mode == "cancel")
            result = read_result(job_dir) or {}
            if code == EXIT_OK:
                self._set(store, "evaluating", None, progress=self.progress)
                outcome = cycle.conclude(s, buffer, registry, job_dir)
                self.version = outcome.version
                if self.on_concluded is not None:
                    try:
                        self.on_concluded(buffer)
                    except Exception:
                        log.exception("status_refresh_failed", job_id=self.job_id)
                state = outcome.status if outcome.status in ("promoted", "rejected") else "failed"
                return self._finish(store, state, outcome.reason, version=outcome.version)
            if code == EXIT_PAUSED or (code < 0 and self._stop_event.is_set()):
                # (a worker signalled before its handlers were installed dies of the signal:
                # asked to stop, it stopped; a paused job without a checkpoint restarts from 0)
                return self._finish(store, self._stopped_state(),
                                    self._stop_reason or result.get("reason") or "paused")
            if code == EXIT_CANCELLED:
                return self._finish(store, "cancelled", self._stop_reason or result.get("reason") or "cancelled")
            return self._finish(store, "failed", result.get("reason") or _no_result(job_dir, code))
        except cycle.CycleError as e:
            return self._finish(store, "failed", str(e))
        except Exception as e:
            log.exception("job_crashed", job_id=self.job_id)
            return self._finish(store, "failed", f"{type(e).__name__}: {e}")
        finally:
            held.close()
            buffer.close()

    def _stopped_state(self) -> str:
        return "cancelled" if self._mode == "cancel" else "paused"

    def _finish(self, store: "JobStore", state: str, reason: str, **fields) -> None:
        self.final_state, self.reason = state, reason
        job_dir = self._job_dir()
        if state in ("promoted", "rejected", "cancelled") and job_dir is not None:
            # Checkpoints only serve a resume; the adapter is in the registry by now. A failed
            # job keeps them for a look at what went wrong.
            import shutil

            shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
        try:
            self._set(store, state, reason, progress=self.progress, **fields)
        except Exception:
            log.exception("job_state_not_saved", job_id=self.job_id, state=state)
        event = {"promoted": "job_promoted", "rejected": "job_rejected", "failed": "job_failed",
                 "cancelled": "job_cancelled", "paused": "job_paused"}[state]
        log.info(event, job_id=self.job_id, reason=reason, version=fields.get("version"))


def _no_result(job_dir: Path, code: int) -> str:
    """Why a worker that wrote no result.json failed, as far as the daemon can tell."""
    import shutil

    reason = f"worker exited with code {code}"
    try:
        free = shutil.disk_usage(job_dir).free
    except OSError:
        return reason
    if free < 1 << 20:  # the worker could not even write why (the disk-full fault test)
        reason += f" without writing its result: the disk holding {job_dir} is full ({free} bytes free)"
    return reason
