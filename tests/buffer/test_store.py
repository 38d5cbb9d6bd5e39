"""The buffer database: migrations, WAL, atomic batches, permissions."""

from __future__ import annotations

import itertools
import os
import re
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad.buffer import schema, store
from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Batch, Buffer, Quarantined


def test_migrations_build_the_schema_on_a_fresh_in_memory_database():
    with Buffer(":memory:") as b:
        tables = {r[0] for r in b.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"artifacts", "chains", "quarantine", "ingest_state", "audit", "_migrations"} <= tables
        assert "files" not in tables  # signatures live on the rows since 0008
        applied = [r[0] for r in b.conn.execute("SELECT name FROM _migrations ORDER BY name")]
        assert applied == [name for name, _ in schema.MIGRATIONS]


def test_migrations_run_once_and_reopen_is_a_no_op(tmp_path):
    path = tmp_path / "b.sqlite3"
    Buffer(path).close()
    with Buffer(path) as b:
        assert schema.migrate(b.db) == []
        assert b.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_0008_moves_file_signatures_onto_the_rows_they_belong_to(tmp_path, monkeypatch):
    path = tmp_path / "b.sqlite3"
    before = [m for m in schema.MIGRATIONS if m[0] < "0008"]
    monkeypatch.setattr(schema, "MIGRATIONS", before)
    with Buffer(path) as b:  # a buffer as lorad left it before 0008
        b.conn.executemany(
            "INSERT INTO artifacts (source, locator, artifact_id, workflow_id, action_pair_id, status, content, "
            "content_hash, ingested_at, updated_at) VALUES ('s', ?, ?, 'w', 'a', 'accepted', 'x', ?, 0, 0)",
            [("ok.json", "a1", "h1"), ("broken-now.json", "a2", "h2"), ("unsigned.json", "a3", "h3")],
        )
        b.conn.executemany(
            "INSERT INTO quarantine (source, locator, reason, content_hash, size, first_seen, last_seen) "
            "VALUES ('s', ?, 'bad', ?, ?, 0, 0)",
            [("broken-now.json", "h9", 9), ("huge.json", None, 99), ("unreadable.json", None, None)],
        )
        b.conn.executemany(
            "INSERT INTO files VALUES ('s', ?, ?, ?, ?)",
            [("ok.json", 1, 10, "h1"), ("broken-now.json", 9, 90, "h9"), ("huge.json", 99, 990, "-")],
        )
    monkeypatch.undo()
    with Buffer(path) as b:
        assert b.file_signatures("s") == {
            "ok.json": (1, 10, "h1"),
            "broken-now.json": (9, 90, "h9"),
            "huge.json": (99, 990, "-"),
        }
        # those of a few locators only (a scan of changed paths), the quarantine entry still winning
        assert b.file_signatures("s", ["broken-now.json", "huge.json", "gone.json"]) == {
            "broken-now.json": (9, 90, "h9"),
            "huge.json": (99, 990, "-"),
        }
        assert b.file_signatures("s", []) == {}
        tables = {r[0] for r in b.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "files" not in tables


_OR_CHECK = re.compile(r"CHECK \((\w+) = ('[^']*')((?: OR \1 = '[^']*')*)\)")


def _in_lists(sql: str) -> str:
    """A CHECK as lorad wrote it before 0009: ``x IN ('a','b')``."""

    def one(m):
        values = [m.group(2)] + re.findall(r"= ('[^']*')", m.group(3))
        return f"CHECK ({m.group(1)} IN ({','.join(values)}))"

    return _OR_CHECK.sub(one, sql)


def _schema(conn) -> set[tuple]:
    return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name != '_migrations'"))


def _make_old(path, tables: list[str], forget: list[str], jobs_sql: str | None = None) -> None:
    """Turn a buffer into one an older lorad left: ``tables`` with IN-list CHECKs, and the
    ``forget`` migrations not yet applied."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    old = {t: _in_lists(schema._table_sql(conn, t)) for t in tables}
    if jobs_sql is not None:
        old["jobs"], old["job_events"] = jobs_sql, schema.JOB_EVENTS_DDL
    schema._rebuild(conn, {t: old[t] for t in schema._ORDER if t in old})
    conn.executemany("DELETE FROM _migrations WHERE name = ?", [(n,) for n in forget])
    conn.execute("COMMIT")
    conn.close()


def test_0009_rebuilds_tables_with_in_list_checks_and_keeps_their_rows(tmp_path):
    path = tmp_path / "b.sqlite3"
    with Buffer(path) as b:
        batch = Batch("s")
        batch.artifacts = [_row("a"), _row("b", status="rejected")]
        b.write_batch(batch)
        b.conn.execute(
            "INSERT INTO jobs (job_id, state, trigger, created_at, updated_at) VALUES ('j', 'queued', 'window', 0, 0)"
        )
        b.conn.execute("INSERT INTO job_events (job_id, ts, state) VALUES ('j', 0, 'queued')")
        before = list(b.artifacts())
    _make_old(path, ["artifacts", "chains", "examples"], ["0009_checks_without_in_lists"])
    conn = sqlite3.connect(path)
    assert "status IN ('pending'," in schema._table_sql(conn, "artifacts")
    conn.close()
    with Buffer(path) as b:
        sql = "\n".join(r[0] for r in b.conn.execute("SELECT sql FROM sqlite_master WHERE sql LIKE '%CHECK%'"))
        assert " IN (" not in sql and "status = 'superseded'" in sql
        assert list(b.artifacts()) == before
        assert b.conn.execute("SELECT job_id FROM job_events").fetchall() == [("j",)]
        assert b.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert b.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            b.conn.execute("UPDATE artifacts SET status = 'bogus' WHERE locator = 'a'")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            b.conn.execute("UPDATE chains SET outcome = 'bogus'")
        migrated = _schema(b.conn)
    with Buffer(tmp_path / "new.sqlite3") as b:  # the same tables as a new buffer's, to the byte
        assert _schema(b.conn) == migrated


# The jobs table as lorad made it before 0010: with IN lists when `lorad ingest` opened the
# buffer first (0004 ran after 0009), rewritten to OR chains when the daemon did; neither
# admitted the "cli" trigger.
_OLD_JOBS = """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            state TEXT NOT NULL CHECK (state IN ('queued', 'preparing', 'training', 'evaluating', 'promoted', 'rejected', 'failed', 'cancelled', 'paused')),
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
        )"""  # noqa: E501 - the table's text as an old database holds it


@pytest.mark.parametrize("first", ["lorad ingest", "lorad serve"])
def test_0010_brings_a_jobs_table_of_either_opening_order_to_one_schema(tmp_path, first):
    path = tmp_path / "b.sqlite3"
    Buffer(path).close()
    old = _OLD_JOBS if first == "lorad ingest" else schema._or_checks(_OLD_JOBS)
    _make_old(path, [], ["0010_one_jobs_table"], jobs_sql=old)
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO jobs (job_id, state, trigger, created_at, updated_at) VALUES ('j', 'paused', 'window', 1, 2)"
    )
    conn.execute("INSERT INTO job_events (job_id, ts, state, reason) VALUES ('j', 1, 'paused', 'why')")
    conn.commit()
    conn.close()
    with Buffer(path) as b:
        assert b.conn.execute("SELECT job_id, state, trigger FROM jobs").fetchall() == [("j", "paused", "window")]
        assert b.conn.execute("SELECT reason FROM job_events").fetchall() == [("why",)]
        assert b.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        b.conn.execute(
            "INSERT INTO jobs (job_id, state, trigger, created_at, updated_at) VALUES ('c', 'queued', 'cli', 1, 1)"
        )
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            b.conn.execute("UPDATE jobs SET trigger = 'bogus'")
        migrated = _schema(b.conn)
    with Buffer(tmp_path / "new.sqlite3") as b:
        assert _schema(b.conn) == migrated


# The jobs table as 0010 made it: OR chains, the "cli" trigger, and no "skipped" state, so a
# cycle with nothing to train on could not record how it ended.
_JOBS_0010 = _OLD_JOBS.replace("trigger IN ('window', 'manual')", "trigger IN ('window', 'manual', 'cli')")


def test_0011_lets_a_jobs_table_made_before_it_record_skipped_jobs(tmp_path):
    path = tmp_path / "b.sqlite3"
    Buffer(path).close()
    _make_old(path, [], ["0011_skipped_job_state"], jobs_sql=schema._or_checks(_JOBS_0010))
    conn = sqlite3.connect(path)
    assert "skipped" not in schema._table_sql(conn, "jobs")
    conn.execute(
        "INSERT INTO jobs (job_id, state, trigger, created_at, updated_at, started_at) "
        "VALUES ('j', 'preparing', 'cli', 1, 2, 2)"
    )
    conn.execute("INSERT INTO job_events (job_id, ts, state, reason) VALUES ('j', 1, 'queued', 'cli')")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("UPDATE jobs SET state = 'skipped' WHERE job_id = 'j'")
    conn.commit()
    conn.close()
    with Buffer(path) as b:
        assert b.conn.execute("SELECT job_id, state, trigger, started_at FROM jobs").fetchall() == [
            ("j", "preparing", "cli", 2)
        ]
        assert b.conn.execute("SELECT reason FROM job_events").fetchall() == [("cli",)]
        JobStore(b.conn).transition("j", "skipped", "nothing new")
        assert JobStore(b.conn).get("j")["state"] == "skipped"
        assert b.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert b.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            b.conn.execute("UPDATE jobs SET state = 'bogus'")
        migrated = _schema(b.conn)
    with Buffer(tmp_path / "new.sqlite3") as b:
        assert _schema(b.conn) == migrated


def test_a_reader_refuses_a_buffer_an_older_lorad_left_with_what_to_do(tmp_path):
    path = tmp_path / "b.sqlite3"
    Buffer(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM _migrations WHERE name = '0010_one_jobs_table'")
    conn.commit()
    conn.close()
    with pytest.raises(store.BufferError, match="0010_one_jobs_table not applied.*lorad ingest"):
        Buffer(path, readonly=True)


def test_a_new_buffer_has_16k_pages_and_an_old_one_keeps_its_own(tmp_path):
    with Buffer(tmp_path / "new.sqlite3") as b:
        assert b.conn.execute("PRAGMA page_size").fetchone()[0] == 16384
        assert b.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (64 << 20) // 16384
        indexes = {r[0] for r in b.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "artifacts_group" in indexes and not {"artifacts_chain", "artifacts_artifact_id"} & indexes
    old = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(old)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with Buffer(old) as b:
        assert b.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert b.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (64 << 20) // 4096


def test_a_failing_migration_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + [("9999_broken", broken)])
    with pytest.raises(RuntimeError):
        Buffer(tmp_path / "b.sqlite3")
    conn = sqlite3.connect(tmp_path / "b.sqlite3")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names
    assert "9999_broken" not in {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    assert "artifacts" in names  # the earlier migrations stayed


def _row(locator: str, **kw) -> dict:
    row = {c: None for c in store.ARTIFACT_COLUMNS}
    row.update(
        source="s",
        locator=locator,
        artifact_id=locator,
        workflow_id="w",
        action_pair_id="a",
        attempt_number=1,
        status="accepted",
        content="x",
        fatal=0,
        specification="spec",
        constraints="",
        origin="generated",
        content_hash=f"h-{locator}",
    )
    row.update(kw)
    return row


def test_a_batch_that_fails_midway_writes_nothing(buffer):
    batch = Batch("s")
    batch.artifacts = [
        _row("a", file_size=1, file_mtime_ns=1),
        _row("b", status="bogus"),
    ]  # CHECK constraint fails on the second
    batch.quarantined = [Quarantined("s", "c", "bad", size=3, mtime_ns=1)]
    with pytest.raises(sqlite3.IntegrityError):
        buffer.write_batch(batch)
    assert buffer.counts()["artifacts"] == 0
    assert buffer.file_signatures("s") == {}
    assert buffer.quarantine() == []


def test_write_batch_counts_new_updated_and_unchanged(buffer):
    b1 = Batch("s")
    b1.artifacts = [_row("a"), _row("b")]
    assert buffer.write_batch(b1) == (2, 0, 0)
    b2 = Batch("s")
    b2.artifacts = [_row("a"), _row("b", content_hash="changed", status="rejected")]
    assert buffer.write_batch(b2) == (0, 1, 1)
    assert {r["locator"]: r["status"] for r in buffer.artifacts()} == {"a": "accepted", "b": "rejected"}


def test_database_files_are_not_world_readable(tmp_path):
    with Buffer(tmp_path / "b.sqlite3") as b:
        b.record_event("test_event", x=1)
    mode = (tmp_path / "b.sqlite3").stat().st_mode & 0o777
    assert mode & 0o007 == 0


def test_audit_events_round_trip(buffer):
    buffer.record_event("adapter_promoted", version="v0001-x", reasons=["better"])
    [e] = buffer.events()
    assert e["event"] == "adapter_promoted" and e["version"] == "v0001-x"
    assert e["detail"] == {"reasons": ["better"]}


def test_readonly_buffer_reads_without_writing(tmp_path):
    path = tmp_path / "b.sqlite3"
    Buffer(path).close()
    with Buffer(path, readonly=True) as ro:
        assert ro.counts()["artifacts"] == 0
        with pytest.raises(sqlite3.OperationalError):
            ro.conn.execute("INSERT INTO audit (ts, event) VALUES (1, 'x')")


# -- linking across batches ------------------------------------------------------------------------

STATUSES = ("accepted", "rejected", "pending", "superseded")


@st.composite
def attempt_rows(draw):
    """Attempts of a few groups, some linked by previous_attempt_id and some only numbered."""
    rows = []
    for g in range(draw(st.integers(1, 4))):
        for c in range(draw(st.integers(1, 3))):  # chains sharing the group
            previous = None
            for n in range(1, draw(st.integers(1, 4)) + 1):
                aid = f"g{g}c{c}n{n}"
                rows.append(
                    _row(
                        f"objects/{aid}.json",
                        artifact_id=aid,
                        workflow_id=f"w{g % 2}",
                        action_pair_id=f"a{g}",
                        attempt_number=n,
                        created_ts=float(len(rows)),
                        previous_attempt_id=previous if draw(st.booleans()) else None,
                        status=draw(st.sampled_from(STATUSES)),
                    )
                )
                previous = aid
    return rows


def _linked(buffer) -> tuple[list, list]:
    chains = buffer.conn.execute(
        "SELECT chain_id, workflow_id, action_pair_id, attempts, rejected, outcome, first_ts, last_ts, "
        "(SELECT locator FROM artifacts WHERE id = c.accepted_id) FROM chains c ORDER BY chain_id"
    ).fetchall()
    members = buffer.conn.execute("SELECT locator, chain_id FROM artifacts ORDER BY locator").fetchall()
    return chains, members


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=attempt_rows(), data=st.data())
def test_chains_do_not_depend_on_how_rows_are_split_into_batches(rows, data):
    with Buffer(":memory:") as whole, Buffer(":memory:") as pieces:
        batch = Batch("s")
        batch.artifacts = [dict(r) for r in rows]
        whole.write_batch(batch)
        order = data.draw(st.permutations(rows))
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(rows) - 1)), max_size=4)))
        for a, b in itertools.pairwise([0, *cuts, len(order)]):
            part = Batch("s")
            part.artifacts = [dict(r) for r in order[a:b]]
            pieces.write_batch(part)
        assert _linked(pieces) == _linked(whole)
        # A rewrite (a pending attempt decided later) relinks the same way in either buffer.
        rewritten = [dict(r, status="accepted", content_hash="decided") for r in rows if r["status"] == "pending"]
        for buffer in (whole, pieces):
            again = Batch("s")
            again.artifacts = [dict(r) for r in rewritten]
            buffer.write_batch(again)
        assert _linked(pieces) == _linked(whole)


# -- a scan's commits are made durable once, at its end ---------------------------------------------


def _synced(monkeypatch) -> list[str]:
    """Paths the buffer fsyncs itself (when a checkpoint could not copy the whole WAL)."""
    from lorad import durable

    calls = []
    real = durable.os.fsync
    monkeypatch.setattr(durable.os, "fsync", lambda fd: calls.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    return calls


def test_inside_deferred_sync_commits_do_not_wait_for_the_disk_and_leaving_checkpoints(tmp_path, monkeypatch):
    synced = _synced(monkeypatch)
    with Buffer(tmp_path / "b.sqlite3") as b:
        assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # full
        with b.deferred_sync():
            assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # normal
            batch = Batch("s")
            batch.artifacts = [_row("a")]
            b.write_batch(batch)
            assert b.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] > 0
        assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        busy, frames, copied = b.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert frames == copied  # the end of the scope copied the WAL into the synced database
    assert synced == []


def test_a_reader_holding_the_wal_makes_leaving_sync_the_wal_itself(tmp_path, monkeypatch):
    synced = _synced(monkeypatch)
    path = tmp_path / "b.sqlite3"
    with Buffer(path) as b:
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM artifacts").fetchone()  # a snapshot from before
        with b.deferred_sync():
            batch = Batch("s")
            batch.artifacts = [_row("a")]
            b.write_batch(batch)
        assert synced == [f"{path}-wal"]
        reader.close()


def test_a_scope_that_committed_nothing_touches_nothing(tmp_path, monkeypatch):
    synced = _synced(monkeypatch)
    checkpoints = []
    with Buffer(tmp_path / "b.sqlite3") as b:
        monkeypatch.setattr(b, "checkpoint", lambda: checkpoints.append(1) or True)
        with b.deferred_sync():
            b.file_signatures("s")
    assert checkpoints == [] and synced == []


def test_with_synchronous_normal_leaving_only_checkpoints(tmp_path, monkeypatch):
    synced = _synced(monkeypatch)
    path = tmp_path / "b.sqlite3"
    with Buffer(path, synchronous="normal") as b:
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM artifacts").fetchone()
        with b.deferred_sync():
            assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
            batch = Batch("s")
            batch.artifacts = [_row("a")]
            b.write_batch(batch)
        assert b.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
        reader.close()
    assert synced == []  # "normal" promises no durability across power loss


def _checkpointers() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "lorad-checkpoint"]


def test_a_scan_of_several_batches_is_copied_into_the_database_as_it_goes(tmp_path):
    import time

    path = tmp_path / "b.sqlite3"
    with Buffer(path) as b:
        b.checkpoint()
        empty = path.stat().st_size
        with b.deferred_sync():
            for n in range(3):
                batch = Batch("s")
                batch.artifacts = [_row(f"{n}-{i}", content="x" * 2000) for i in range(200)]
                b.write_batch(batch)
            assert len(_checkpointers()) == 1
            deadline = time.monotonic() + 10
            while path.stat().st_size <= empty and time.monotonic() < deadline:
                time.sleep(0.01)
            assert path.stat().st_size > empty  # copied while the scope is still open
        assert _checkpointers() == []
        assert b.counts()["artifacts"] == 600
        assert b.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_one_batch_scope_starts_no_checkpointer(tmp_path):
    with Buffer(tmp_path / "b.sqlite3") as b, b.deferred_sync():
        batch = Batch("s")
        batch.artifacts = [_row("a")]
        b.write_batch(batch)
        assert _checkpointers() == []
