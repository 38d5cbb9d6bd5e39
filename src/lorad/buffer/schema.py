"""The buffer's schema: every migration, in one place, applied in name order.

Whatever command opens a buffer first (``lorad ingest``, ``lorad serve``, ``lorad train``), it
gets the same tables: :func:`migrate` applies each migration named ``NNNN_<what>`` once, in
its own transaction, in name order. Numbers are never reused; 0003 was never applied
anywhere (the registry keeps its truth in lorad.json files, its events in ``audit``).

CHECK constraints list their values as ``x = 'a' OR x = 'b'``, never ``x IN ('a', 'b')``:
SQLite evaluates an IN list in a CHECK by building a temporary table for every inserted row
(~2 us, a fifth of an artifact insert). A table that still has the old form is rebuilt
(copy, drop, create, copy back: :func:`_rebuild`), never edited through ``writable_schema``.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[tuple[str, Migration]] = []

# Chains that never become examples (open, or without a specification); an index covers them.
UNUSABLE_CHAINS = "outcome = 'open' OR trim(specification) = ''"

# skipped: the cycle found nothing to train on (admitted since 0011_skipped_job_state).
JOB_STATES = (
    "queued",
    "preparing",
    "training",
    "evaluating",
    "promoted",
    "rejected",
    "failed",
    "cancelled",
    "paused",
    "skipped",
)
# window: the scheduler; manual: `lorad train-now` over the socket; cli: `lorad train`.
JOB_TRIGGERS = ("window", "manual", "cli")


def migration(name: str):
    """Register a numbered migration; each runs once, inside its own transaction."""

    def register(fn: Migration) -> Migration:
        if any(n == name for n, _ in MIGRATIONS):
            raise ValueError(f"duplicate migration {name}")
        MIGRATIONS.append((name, fn))
        MIGRATIONS.sort(key=lambda m: m[0])
        return fn

    return register


def _one_of(column: str, values) -> str:
    return "CHECK (" + " OR ".join(f"{column} = '{v}'" for v in values) + ")"


JOBS_DDL = f"""CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL {_one_of("state", JOB_STATES)},
    trigger TEXT NOT NULL {_one_of("trigger", JOB_TRIGGERS)},
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    runs INTEGER NOT NULL DEFAULT 0,
    job_dir TEXT,
    version TEXT,
    reason TEXT,
    progress TEXT
)"""

JOB_EVENTS_DDL = """CREATE TABLE job_events (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (job_id),
    ts REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
)"""


@migration("0001_initial")
def _initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE artifacts (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            locator TEXT NOT NULL,
            artifact_id TEXT NOT NULL,
            workflow_id TEXT NOT NULL,
            action_pair_id TEXT NOT NULL,
            parent_action_pair_id TEXT,
            previous_attempt_id TEXT,
            attempt_number INTEGER,
            status TEXT NOT NULL CHECK (status = 'pending' OR status = 'rejected' OR status = 'accepted' OR status = 'superseded'),
            created_at TEXT,
            created_ts REAL,
            content TEXT NOT NULL,
            passed INTEGER,
            fatal INTEGER NOT NULL DEFAULT 0,
            feedback TEXT,
            sub_results TEXT,
            specification TEXT NOT NULL DEFAULT '',
            constraints TEXT NOT NULL DEFAULT '',
            feedback_history TEXT,
            dependency_artifacts TEXT,
            origin TEXT NOT NULL DEFAULT 'generated',
            metadata TEXT,
            messages TEXT,
            score REAL,
            content_hash TEXT NOT NULL,
            chain_id TEXT,
            ingested_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (source, locator)
        )
        """  # noqa: E501 - the table as migration 0001 created it; its text is kept
    )
    db.execute("CREATE INDEX artifacts_group ON artifacts (source, workflow_id, action_pair_id)")
    db.execute("CREATE INDEX artifacts_artifact_id ON artifacts (source, artifact_id)")
    db.execute("CREATE INDEX artifacts_chain ON artifacts (chain_id)")
    db.execute("CREATE INDEX artifacts_created ON artifacts (created_ts)")  # dropped again in 0005
    db.execute(
        """
        CREATE TABLE chains (
            chain_id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            workflow_id TEXT NOT NULL,
            action_pair_id TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            rejected INTEGER NOT NULL,
            accepted_id INTEGER,
            outcome TEXT NOT NULL CHECK (outcome = 'first_try' OR outcome = 'refined' OR outcome = 'exhausted' OR outcome = 'open'),
            specification TEXT NOT NULL DEFAULT '',
            first_ts REAL,
            last_ts REAL,
            updated_at REAL NOT NULL
        )
        """  # noqa: E501 - the table as migration 0001 created it; its text is kept
    )
    db.execute("CREATE INDEX chains_group ON chains (source, workflow_id, action_pair_id)")
    db.execute("CREATE INDEX chains_outcome ON chains (outcome)")
    db.execute(
        """
        CREATE TABLE quarantine (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            locator TEXT NOT NULL,
            reason TEXT NOT NULL,
            content_hash TEXT,
            size INTEGER,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            seen INTEGER NOT NULL DEFAULT 1,
            UNIQUE (source, locator)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE files (
            source TEXT NOT NULL,
            locator TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            PRIMARY KEY (source, locator)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE ingest_state (
            source TEXT PRIMARY KEY,
            state TEXT NOT NULL DEFAULT '{}',
            last_scan REAL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            event TEXT NOT NULL,
            version TEXT,
            job_id TEXT,
            detail TEXT NOT NULL DEFAULT '{}'
        )
        """
    )
    db.execute("CREATE INDEX audit_event ON audit (event, ts)")


@migration("0002_examples")
def _examples(db) -> None:
    db.execute(
        """
        CREATE TABLE examples (
            id INTEGER PRIMARY KEY,
            seq INTEGER NOT NULL UNIQUE,
            chain_id TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL,
            workflow_id TEXT NOT NULL,
            action_pair_id TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome = 'first_try' OR outcome = 'refined' OR outcome = 'exhausted'),
            retries INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            origin TEXT NOT NULL,
            generated_only INTEGER NOT NULL,
            created_ts REAL NOT NULL,
            task_key TEXT NOT NULL,
            answer_key TEXT NOT NULL,
            text_key TEXT NOT NULL,
            chain_key TEXT NOT NULL,
            split TEXT NOT NULL CHECK (split = 'train' OR split = 'heldout'),
            duplicate_of INTEGER,
            duplicate TEXT CHECK (duplicate = 'exact' OR duplicate = 'near'),
            minhash BLOB NOT NULL,
            updated_at REAL NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX examples_split_seq ON examples (split, seq)")
    # Covers the replay draw's lookups by seq with every column a policy tests: no table reads.
    db.execute(
        "CREATE INDEX examples_probe ON examples (seq, split, duplicate_of, outcome, retries, "
        "generated_only, origin, created_ts, action_pair_id)"
    )
    db.execute("CREATE INDEX examples_group ON examples (source, workflow_id, action_pair_id)")
    db.execute("CREATE INDEX examples_task ON examples (task_key)")
    db.execute("CREATE INDEX examples_answer ON examples (answer_key)")
    db.execute("CREATE INDEX examples_text ON examples (text_key)")
    db.execute("CREATE INDEX examples_duplicate_of ON examples (duplicate_of)")
    db.execute("CREATE INDEX examples_retries ON examples (retries)")  # max(retries) for weighted draws
    db.execute(
        "CREATE TABLE example_bands (band INTEGER NOT NULL, key INTEGER NOT NULL, example_id INTEGER NOT NULL, "
        "PRIMARY KEY (band, key, example_id)) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX example_bands_example ON example_bands (example_id)")
    db.execute("CREATE TABLE splits (task_key TEXT PRIMARY KEY, split TEXT NOT NULL) WITHOUT ROWID")
    db.execute("CREATE TABLE examples_state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
    # Chains that are not examples, counted without reading the whole table.
    db.execute(f"CREATE INDEX chains_unusable ON chains (outcome) WHERE {UNUSABLE_CHAINS}")


@migration("0004_jobs")
def _jobs(db: sqlite_utils.Database) -> None:
    db.execute(JOBS_DDL)
    db.execute("CREATE INDEX jobs_state ON jobs (state, created_at)")
    db.execute(JOB_EVENTS_DDL)
    db.execute("CREATE INDEX job_events_job ON job_events (job_id, id)")
    # Small daemon state that must survive restarts: scheduling paused, failure back-off.
    db.execute("CREATE TABLE daemon_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migration("0005_ingest_indexes")
def _ingest_indexes(db: sqlite_utils.Database) -> None:
    # Nothing queries artifacts by created_ts (the recent policy reads examples), and every
    # index is written on each insert: ingest is faster without it.
    db.execute("DROP INDEX IF EXISTS artifacts_created")


@migration("0006_no_artifact_id_index")
def _no_artifact_id_index(db: sqlite_utils.Database) -> None:
    # Feedback sent over the socket finds its parent by locator, which for a JSONL or feedback
    # record is its id: nothing else looked artifacts up by artifact_id.
    db.execute("DROP INDEX IF EXISTS artifacts_artifact_id")


@migration("0007_no_chain_index")
def _no_chain_index(db: sqlite_utils.Database) -> None:
    # A chain's rows are found through its group (chains has it, artifacts_group indexes it);
    # an index on chain_id alone cost every insert ~7 %.
    db.execute("DROP INDEX IF EXISTS artifacts_chain")


@migration("0008_signatures_on_rows")
def _signatures_on_rows(db: sqlite_utils.Database) -> None:
    # A file's signature moves onto the row it became (artifact or quarantine entry): the
    # files table repeated the (source, locator) key both already have, and writing it was a
    # sixth of a first scan's database time.
    db.execute("ALTER TABLE artifacts ADD COLUMN file_size INTEGER")
    db.execute("ALTER TABLE artifacts ADD COLUMN file_mtime_ns INTEGER")
    db.execute("ALTER TABLE quarantine ADD COLUMN mtime_ns INTEGER")
    db.execute(
        "UPDATE artifacts SET (file_size, file_mtime_ns) = (SELECT f.size, f.mtime_ns FROM files f "
        "WHERE f.source = artifacts.source AND f.locator = artifacts.locator "
        "AND f.content_hash = artifacts.content_hash)"
    )
    db.execute(
        "UPDATE quarantine SET (size, mtime_ns) = (SELECT f.size, f.mtime_ns FROM files f "
        "WHERE f.source = quarantine.source AND f.locator = quarantine.locator "
        "AND f.content_hash = coalesce(quarantine.content_hash, '-')) "
        "WHERE EXISTS (SELECT 1 FROM files f WHERE f.source = quarantine.source AND f.locator = quarantine.locator "
        "AND f.content_hash = coalesce(quarantine.content_hash, '-'))"
    )
    db.execute("DROP TABLE files")


_IN_LIST_CHECK = re.compile(r"CHECK \((\w+) IN \(([^()]*)\)\)")


def _or_checks(sql: str) -> str:
    def one(match: re.Match) -> str:
        column, values = match.group(1), [v.strip() for v in match.group(2).split(",")]
        return "CHECK (" + " OR ".join(f"{column} = {v}" for v in values) + ")"

    return _IN_LIST_CHECK.sub(one, sql)


def _table_sql(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
    return row[0] if row else None


def _rebuild(conn: sqlite3.Connection, tables: dict[str, str]) -> None:
    """Recreate ``tables`` (name -> CREATE statement, parents before children) with their rows.

    Each table is copied aside, dropped (children first, so no foreign key is ever broken),
    created from its new statement, and filled from the copy; its indexes are recreated. The
    caller's transaction makes it all or nothing.
    """
    names = list(tables)
    marks = ", ".join("?" for _ in names)
    indexes = [
        sql
        for (sql,) in conn.execute(
            f"SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name IN ({marks}) AND sql IS NOT NULL", names
        )
    ]
    for name in names:
        conn.execute(f"CREATE TABLE _rebuild_{name} AS SELECT * FROM {name}")
    for name in reversed(names):
        conn.execute(f"DROP TABLE {name}")
    for name, sql in tables.items():
        conn.execute(sql)
        columns = ", ".join(row[1] for row in conn.execute(f"PRAGMA table_info(_rebuild_{name})"))
        conn.execute(f"INSERT INTO {name} ({columns}) SELECT {columns} FROM _rebuild_{name}")
        conn.execute(f"DROP TABLE _rebuild_{name}")
    for sql in indexes:
        conn.execute(sql)


# Parents before children: job_events references jobs.
_ORDER = ("artifacts", "chains", "quarantine", "examples", "jobs", "job_events")


@migration("0009_checks_without_in_lists")
def _checks_without_in_lists(db: sqlite_utils.Database) -> None:
    # A buffer made before this migration has IN lists in its CHECKs; a new one never had them.
    conn = db.conn
    old = {name: sql for name in _ORDER if (sql := _table_sql(conn, name)) and _or_checks(sql) != sql}
    if "jobs" in old and (job_events := _table_sql(conn, "job_events")):
        old["job_events"] = job_events
    _rebuild(conn, {name: _or_checks(old[name]) for name in _ORDER if name in old})


def _jobs_as_built(conn: sqlite3.Connection) -> None:
    """Rebuild the jobs table (and job_events, which references it) to JOBS_DDL unless it is that."""
    sql = _table_sql(conn, "jobs")
    if sql is not None and " ".join(sql.split()) != " ".join(JOBS_DDL.split()):
        _rebuild(conn, {"jobs": JOBS_DDL, "job_events": JOB_EVENTS_DDL})


@migration("0010_one_jobs_table")
def _one_jobs_table(db: sqlite_utils.Database) -> None:
    # Until migrations lived in this module, 0004 registered itself only once the daemon's
    # module was imported: a buffer first opened by `lorad ingest` got it after 0009, with IN
    # lists the daemon's buffers did not have. Both become JOBS_DDL, which also admits the
    # "cli" trigger (`lorad train` jobs).
    _jobs_as_built(db.conn)


@migration("0011_skipped_job_state")
def _skipped_job_state(db: sqlite_utils.Database) -> None:
    # A cycle with nothing to train on ends "skipped", which the CHECK did not admit: the row
    # stayed "preparing", `lorad train-now --wait` never returned, and every daemon start
    # paused, resumed and skipped the job again (issue 23). The rows keep their states.
    _jobs_as_built(db.conn)


@migration("0012_split_families")
def _split_families(db: sqlite_utils.Database) -> None:
    # The held-out floor covers every family (buffer/split.py); tasks split before this have none.
    db.conn.execute("ALTER TABLE splits ADD COLUMN family TEXT")


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply every migration not yet applied, each in its own transaction. Returns their names."""
    conn = db.conn
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    applied = []
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have applied it while we waited for the write lock.
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone():
                conn.execute("ROLLBACK")
                continue
            fn(db)
            conn.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
