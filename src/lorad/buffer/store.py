"""The replay buffer: one SQLite database in state_dir.

WAL mode, numbered transactional migrations, and every write batched in one transaction
together with the bookkeeping that says it happened (file signatures, JSONL offsets), so a
crash at any instant either keeps a whole batch or none of it.

Its tables (the schema and every migration are in :mod:`lorad.buffer.schema`):

- ``artifacts``: one row per attempt, normalised from any source; unique on
  (source, locator), where the locator is the file path in the store or the JSONL record id.
- ``chains``: retry chains linked from the artifacts (see :mod:`lorad.buffer.traces`).
- ``quarantine``: inputs that could not be read, with a human-readable reason.

A file already handled keeps its signature (size, mtime, content hash) on its row: the
artifact's (``file_size``, ``file_mtime_ns``) or the quarantine entry's, so a rescan skips
unchanged files without reading them. (Until migration 0008 a ``files`` table held them.)
- ``ingest_state``: per-source resume state (JSONL byte offset, inode).
- ``audit``: an append-only log of events (promotions, rollbacks, ingest errors).
"""

from __future__ import annotations

import json
import operator
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils
import structlog

from lorad import durable, events
from lorad.buffer import traces
from lorad.buffer.batch import Batch, Quarantined
from lorad.buffer.schema import MIGRATIONS, migrate
from lorad.config import BufferSettings

__all__ = ["ARTIFACT_COLUMNS", "Batch", "Buffer", "BufferError", "Quarantined"]

# Columns of ``artifacts`` that a source fills in, in insert order.
ARTIFACT_COLUMNS = (
    "source",
    "locator",
    "artifact_id",
    "workflow_id",
    "action_pair_id",
    "parent_action_pair_id",
    "previous_attempt_id",
    "attempt_number",
    "status",
    "created_at",
    "created_ts",
    "content",
    "passed",
    "fatal",
    "feedback",
    "sub_results",
    "specification",
    "constraints",
    "feedback_history",
    "dependency_artifacts",
    "origin",
    "metadata",
    "messages",
    "score",
    "content_hash",
    "file_size",
    "file_mtime_ns",
)

_ROW = operator.itemgetter(*ARTIFACT_COLUMNS)
_UPSERT = (
    f"INSERT INTO artifacts ({', '.join(ARTIFACT_COLUMNS)}, chain_id, ingested_at, updated_at) "
    f"VALUES ({', '.join('?' for _ in ARTIFACT_COLUMNS)}, ?, ?, ?) "
    f"ON CONFLICT (source, locator) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in ARTIFACT_COLUMNS if c not in ("source", "locator"))
    + ", chain_id = excluded.chain_id, updated_at = excluded.updated_at"
)


log = structlog.get_logger()

WAL_AUTOCHECKPOINT_BYTES = 64 << 20
PAGE_SIZE = 16384


class BufferError(Exception):
    "The buffer database cannot be opened or written."


class _Checkpointer:
    """A thread copying the WAL into the database after each commit of a scan.

    It has its own connection, with synchronous=NORMAL (each checkpoint syncs the WAL, then
    the database), and runs PASSIVE checkpoints, which never wait for the writer or readers.
    A checkpoint that fails is left to the scan's final one.
    """

    def __init__(self, path: Path):
        self._path = path
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lorad-checkpoint", daemon=True)
        self._thread.start()
        self._wanted.set()  # started by a commit

    def wake(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        """Stop after the checkpoint under way, if any."""
        self._stopping = True
        self._wanted.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            log.debug(events.CHECKPOINTER_UNAVAILABLE, error=str(e))
            return
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:  # the scan's final checkpoint copies what is left
            log.debug(events.CHECKPOINTER_STOPPED, error=str(e))
        finally:
            conn.close()


def _check_schema(conn: sqlite3.Connection, path) -> None:
    """A reader needs every migration applied: it never applies them itself."""
    applied = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    missing = [name for name, _ in MIGRATIONS if name not in applied]
    if missing:
        raise BufferError(
            f"buffer {path} was last opened by an older lorad (migrations {', '.join(missing)} "
            f"not applied); `lorad ingest` or the daemon brings it up to date"
        )


class Buffer:
    """The SQLite replay buffer.

    Args:
        path: database file (created with its folder if missing); ":memory:" for tests.
        synchronous: "full" (durable across power loss) or "normal" (across process crashes).
        readonly: open for reading only (status, history); no migrations are run.
    """

    def __init__(self, path: str | Path, synchronous: str = BufferSettings.synchronous, readonly: bool = False):
        self.path = Path(path) if path != ":memory:" else None
        self.synchronous = synchronous
        self._deferring = False  # inside deferred_sync: commits do not wait for the disk
        self._unsynced = False  # something was committed since deferring began
        self._commits = 0  # commits since deferring began
        self._checkpointer: _Checkpointer | None = None
        try:
            if self.path and not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            if readonly:
                conn = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=30
                )
            else:
                conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                # 16 KiB pages for a new buffer (an existing one keeps its own): rows are about a
                # kilobyte of code and text, and every page a commit changes is one WAL frame
                # (two writes). Measured on 20k artifacts: 8 KiB wrote ~10 % faster than 4 KiB,
                # 16 KiB ~8 % faster than 8 KiB; 32 KiB no faster, with a bigger WAL.
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
                # Checkpoint at 64 MiB of WAL rather than SQLite's 4 MiB: with the default, every
                # ingest batch paid for copying the WAL back into the database and syncing it.
                # Ingest checkpoints once at the end of each scan instead (Buffer.checkpoint).
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_BYTES // page_size}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA cache_size = -65536")  # 64 MiB: index inserts stay in memory
            conn.execute("PRAGMA temp_store = MEMORY")
            self.conn = conn
            self.db = sqlite_utils.Database(conn)
            if not readonly:
                migrate(self.db)
            else:
                _check_schema(conn, path)
        except sqlite3.DatabaseError as e:
            raise BufferError(f"cannot open buffer {path}: {e}") from None
        if self.path and not readonly:
            # The buffer holds users' code and prompts: never world-readable.
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                if p.exists():
                    p.chmod(0o640)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def transaction(self):
        """One write transaction (BEGIN IMMEDIATE .. COMMIT, ROLLBACK on any error)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        if self._deferring:
            self._unsynced = True
            self._commits += 1
            if self._checkpointer is not None:
                self._checkpointer.wake()
            elif self._commits == 2 and self.path is not None:  # a scan of more than one batch (on disk)
                self._checkpointer = _Checkpointer(self.path)

    def checkpoint(self) -> bool:
        """Copy the WAL back into the database where no reader needs it (never blocks).

        Returns:
            True if all of it was copied (the database file then holds every commit, synced).
        """
        busy, frames, copied = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return not busy and frames == copied

    @contextmanager
    def deferred_sync(self):
        """Commits inside do not wait for the disk; leaving makes all of them durable at once.

        For work that can be done again from its input: a scan. Until its end, the store still
        holds every file a batch came from, and a batch lost to a power cut (SQLite keeps the
        database consistent: whole transactions or none) is read again by the next scan, its
        signatures lost with it. With ``synchronous = "full"`` a 20k-file first scan is ~10 %
        faster this way; everything else (pushed feedback, jobs, the registry's events) still
        waits for the disk at each commit.

        From the second commit on, a thread with a connection of its own copies the WAL into
        the database after each commit (SQLite lets a checkpoint run beside a writer), so the
        copying and its syncs overlap the next batches instead of waiting for the end.
        Leaving (if anything was committed) checkpoints what is left, and with "full" syncs
        the WAL itself if a reader kept the checkpoint from copying all of it. Errors there
        are logged, not raised: what was committed stays committed, and the next scan's end
        syncs again.
        """
        if self.path is None or self._deferring:
            yield self
            return
        full = self.synchronous == "full"
        if full:
            self.conn.execute("PRAGMA synchronous = NORMAL")
        self._deferring, self._unsynced, self._commits = True, False, 0
        try:
            yield self
        finally:
            self._deferring = False
            if self._checkpointer is not None:
                self._checkpointer.stop()
                self._checkpointer = None
            if full:
                self.conn.execute("PRAGMA synchronous = FULL")
            if self._unsynced:
                self._sync(power_safe=full)

    def _sync(self, power_safe: bool) -> None:
        try:
            if self.checkpoint() or not power_safe:
                return
        except sqlite3.Error as e:  # busy, or a full disk: the WAL keeps everything meanwhile
            log.warning(events.CHECKPOINT_FAILED, error=str(e))
            if not power_safe:
                return
        try:
            durable.fsync(f"{self.path}-wal")
        except OSError as e:
            log.error(events.BUFFER_SYNC_FAILED, error=str(e), path=f"{self.path}-wal")

    # -- ingest bookkeeping ---------------------------------------------------------------------

    def file_signatures(self, source: str, locators: Iterable[str] | None = None) -> dict[str, tuple[int, int, str]]:
        """locator -> (size, mtime_ns, content_hash) of every file already handled (or of those
        of ``locators``: a scan of a few changed paths need not load the whole buffer's).

        A file quarantined since it last parsed has the quarantine entry's signature (its hash
        "-" when it was refused unread).
        """
        artifacts = (
            "SELECT locator, file_size, file_mtime_ns, content_hash FROM artifacts "
            "WHERE source = ? AND file_mtime_ns IS NOT NULL"
        )
        quarantine = (
            "SELECT locator, size, mtime_ns, coalesce(content_hash, '-') FROM quarantine "
            "WHERE source = ? AND mtime_ns IS NOT NULL"
        )
        if locators is None:
            chunks: list[tuple[str, ...]] = [()]
        else:
            wanted = sorted(set(locators))
            chunks = [tuple(wanted[i : i + 900]) for i in range(0, len(wanted), 900)]
        signatures: dict[str, tuple[int, int, str]] = {}
        for sql in (artifacts, quarantine):  # a quarantine entry wins over an older row of its file
            for chunk in chunks:
                where = f" AND locator IN ({', '.join('?' for _ in chunk)})" if chunk else ""
                signatures.update(
                    (loc, (size, mtime, h)) for loc, size, mtime, h in self.conn.execute(sql + where, (source, *chunk))
                )
        return signatures

    def quarantined_locators(self, source: str) -> set[str]:
        """The locators of ``source``'s quarantine entries."""
        return {loc for (loc,) in self.conn.execute("SELECT locator FROM quarantine WHERE source = ?", (source,))}

    def source_state(self, source: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT state FROM ingest_state WHERE source = ?", (source,)).fetchone()
        return json.loads(row[0]) if row else {}

    def write_batch(self, batch: Batch) -> tuple[int, int, int]:
        """Commit one batch atomically: rows with their file signatures, quarantine, source
        state, chains.

        A new row whose artifact (workflow and artifact id) is already stored from another
        locator, or comes earlier in the batch, is not stored again: it moves to
        ``batch.quarantined``, with its file's signature, so a rescan skips it while it stays
        the same. The quarantine entries of ``batch.gone`` (files no longer there) are dropped.

        Returns:
            (new, updated, unchanged) artifact counts.
        """
        now = time.time()
        new = updated = unchanged = 0
        source = batch.source
        with self.transaction() as conn:
            # (size, mtime_ns, source, locator, hash) of files read again with the content stored
            signed = [(size, mtime, source, locator, digest) for locator, size, mtime, digest in batch.touched]
            if batch.artifacts:
                existing = {}
                locators = [row["locator"] for row in batch.artifacts]
                for i in range(0, len(locators), 900):
                    chunk = locators[i : i + 900]
                    existing.update(
                        conn.execute(
                            f"SELECT locator, content_hash FROM artifacts WHERE source = ? AND locator IN "
                            f"({', '.join('?' for _ in chunk)})",
                            (source, *chunk),
                        ).fetchall()
                    )
                owners = self._owners(conn, source, [row for row in batch.artifacts if row["locator"] not in existing])
                changed: dict[str, dict] = {}
                for row in batch.artifacts:
                    old = existing.get(row["locator"])
                    if old is None:
                        owner = owners.setdefault((row["workflow_id"], row["artifact_id"]), row["locator"])
                        if owner != row["locator"]:  # the same artifact, reached by another path
                            batch.quarantined.append(
                                Quarantined(
                                    source,
                                    row["locator"],
                                    f"artifact {row['artifact_id']} is already stored from {owner}",
                                    row["content_hash"],
                                    row["file_size"],
                                    row["file_mtime_ns"],
                                )
                            )
                            continue
                        new += 1
                    elif old != row["content_hash"]:
                        updated += 1
                    else:
                        unchanged += 1
                        if row["file_mtime_ns"] is not None:
                            signed.append((row["file_size"], row["file_mtime_ns"], source, row["locator"], old))
                        continue
                    existing[row["locator"]] = row["content_hash"]  # a repeat within the batch
                    changed[row["locator"]] = row
                if changed:
                    plan = traces.plan_links(conn, list(changed.values()))
                    conn.executemany(_UPSERT, [_ROW(row) + (row["chain_id"], now, now) for row in changed.values()])
                    traces.apply_links(conn, plan, now)
                if conn.execute("SELECT 1 FROM quarantine WHERE source = ? LIMIT 1", (source,)).fetchone():
                    # A file that parses now leaves quarantine.
                    conn.executemany(
                        "DELETE FROM quarantine WHERE source = ? AND locator = ?", [(source, loc) for loc in locators]
                    )
            if signed:
                conn.executemany(
                    "UPDATE artifacts SET file_size = ?, file_mtime_ns = ? "
                    "WHERE source = ? AND locator = ? AND content_hash = ?",
                    signed,
                )
                conn.executemany(
                    "UPDATE quarantine SET size = ?, mtime_ns = ? "
                    "WHERE source = ? AND locator = ? AND coalesce(content_hash, '-') = ?",
                    signed,
                )
            if batch.gone:
                conn.executemany(
                    "DELETE FROM quarantine WHERE source = ? AND locator = ?", [(source, loc) for loc in batch.gone]
                )
            if batch.quarantined:
                conn.executemany(
                    "INSERT INTO quarantine "
                    "(source, locator, reason, content_hash, size, mtime_ns, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (source, locator) DO UPDATE SET reason = excluded.reason, "
                    "content_hash = excluded.content_hash, size = excluded.size, mtime_ns = excluded.mtime_ns, "
                    "last_seen = excluded.last_seen, seen = quarantine.seen + 1",
                    [
                        (q.source, q.locator, q.reason, q.content_hash, q.size, q.mtime_ns, now, now)
                        for q in batch.quarantined
                    ],
                )
            if batch.state is not None:
                conn.execute(
                    "INSERT INTO ingest_state (source, state, last_scan) VALUES (?, ?, ?) "
                    "ON CONFLICT (source) DO UPDATE SET state = excluded.state, last_scan = excluded.last_scan",
                    (source, json.dumps(batch.state), now),
                )
        return new, updated, unchanged

    @staticmethod
    def _owners(conn: sqlite3.Connection, source: str, rows: list[dict]) -> dict[tuple[str, str], str]:
        """(workflow_id, artifact_id) -> locator of the stored rows that are the artifacts of ``rows``.

        An artifact is what its source says it is, not the path it was reached by: one already
        stored from another locator is not stored again. (Workflows, not ids alone: real stores
        repeat ids such as "unknown" across workflows.) Found through the group index.
        """
        workflows = sorted({row["workflow_id"] for row in rows})
        owners: dict[tuple[str, str], str] = {}
        for i in range(0, len(workflows), 900):
            chunk = workflows[i : i + 900]
            for workflow_id, artifact_id, locator in conn.execute(
                f"SELECT workflow_id, artifact_id, locator FROM artifacts WHERE source = ? AND workflow_id IN "
                f"({', '.join('?' for _ in chunk)})",
                (source, *chunk),
            ):
                owners.setdefault((workflow_id, artifact_id), locator)
        return owners

    # -- reading --------------------------------------------------------------------------------

    def artifacts(self, where: str = "", params: Iterable = ()) -> Iterator[dict]:
        """Artifact rows as dicts (JSON columns left as text), optionally filtered."""
        sql = "SELECT * FROM artifacts" + (f" WHERE {where}" if where else "") + " ORDER BY id"
        cur = self.conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description]
        for row in cur:
            yield dict(zip(names, row, strict=True))

    def counts(self) -> dict[str, int]:
        """Headline counts for status displays."""
        q = self.conn.execute
        out = {
            "artifacts": q("SELECT count(*) FROM artifacts").fetchone()[0],
            "chains": q("SELECT count(*) FROM chains").fetchone()[0],
            "quarantined": q("SELECT count(*) FROM quarantine").fetchone()[0],
        }
        for outcome, n in q("SELECT outcome, count(*) FROM chains GROUP BY outcome"):
            out[f"chains_{outcome}"] = n
        return out

    def quarantine(self) -> list[dict]:
        cur = self.conn.execute(
            "SELECT source, locator, reason, size, first_seen, last_seen, seen FROM quarantine ORDER BY id"
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur]

    def record_event(self, event: str, *, version: str | None = None, job_id: str | None = None, **detail: Any) -> None:
        """Append one event to the audit table (its own transaction)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO audit (ts, event, version, job_id, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), event, version, job_id, json.dumps(detail, default=str)),
            )

    def events(self, event: str | None = None, limit: int = 100) -> list[dict]:
        sql = "SELECT id, ts, event, version, job_id, detail FROM audit"
        params: tuple = ()
        if event:
            sql += " WHERE event = ?"
            params = (event,)
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self.conn.execute(sql, params + (limit,)).fetchall()
        return [
            {"id": i, "ts": ts, "event": ev, "version": v, "job_id": j, "detail": json.loads(d)}
            for i, ts, ev, v, j, d in rows
        ]
