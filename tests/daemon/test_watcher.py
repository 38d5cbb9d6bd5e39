"""The watcher and the ingest loop in-process: events, debounce, reconciliation of missed files."""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import pytest
from daemon_helpers import write_artifact
from structlog.testing import capture_logs

from lorad.buffer.store import Buffer
from lorad.daemon.watcher import IngestLoop, Watcher
from lorad.sources import AtomicGuardSource


def count(buffer) -> int:
    return buffer.conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]


def chains(buffer) -> dict[str, int]:
    return dict(buffer.conn.execute("SELECT outcome, count(*) FROM chains GROUP BY outcome").fetchall())


def wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def running(tmp_path, readers, watcher: Watcher, **loop_kw):
    """An IngestLoop of ``readers`` and ``watcher`` on a new buffer, reconciled once and started;
    yields a read-only connection to that buffer and stops the loop and the watcher after."""
    with Buffer(tmp_path / "b.sqlite3") as buffer, Buffer(tmp_path / "b.sqlite3", readonly=True) as ro:
        loop = IngestLoop(buffer, readers, watcher, **loop_kw)
        watcher.start()
        try:
            loop.reconcile()
            loop.start()
            yield ro
        finally:
            loop.stop()
            watcher.stop()


def test_watched_file_is_in_the_buffer_within_a_second(tmp_path, store):
    reader = AtomicGuardSource("ag", store)
    watcher = Watcher([store])
    with running(tmp_path, [reader], watcher, debounce=0.05, reconcile_interval=3600) as ro:
        assert count(ro) == 102
        t0 = time.monotonic()
        write_artifact(store)
        assert wait(lambda: count(ro) == 103, timeout=1.0)
        assert time.monotonic() - t0 < 1.0


def test_reconciliation_scan_catches_files_whose_events_were_lost(tmp_path, store):
    """A watcher that saw nothing (as after an inotify queue overflow): the periodic scan finds the file."""
    reader = AtomicGuardSource("ag", store)
    blind = Watcher([])  # watches nothing: every event is "lost"
    with running(tmp_path, [reader], blind, reconcile_interval=0.3) as ro:
        write_artifact(store)
        assert wait(lambda: count(ro) == 103, timeout=3.0)
        assert blind.events == 0


def test_an_inotify_queue_overflow_scans_everything_at_once(tmp_path, store):
    """watchdog tells of lost events only in its log: that record starts a full scan, long
    before the reconciliation interval, and the loop says why."""
    import logging

    reader = AtomicGuardSource("ag", store)
    blind = Watcher([])  # no events reach the loop, as for files whose events the kernel dropped
    with running(tmp_path, [reader], blind, reconcile_interval=3600) as ro:
        write_artifact(store)
        assert not wait(lambda: count(ro) == 103, timeout=1.0)  # nothing else would find it for an hour
        with capture_logs() as logs:
            # What watchdog's inotify emitter logs when the kernel reports IN_Q_OVERFLOW.
            logging.getLogger("watchdog.observers.inotify_c").warning(
                "Inotify queue overflowed; filesystem events were lost"
            )
            assert wait(lambda: count(ro) == 103, timeout=3.0)
        assert any(e["event"] == "watch_events_lost" for e in logs)
    assert blind._listener not in logging.getLogger("watchdog.observers").handlers


def test_submitted_task_runs_in_the_writer_thread_and_returns_its_result(tmp_path, store):
    watcher = Watcher([])
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        loop = IngestLoop(buffer, [], watcher, reconcile_interval=3600)
        watcher.start()
        try:
            loop.reconcile()
            loop.start()
            assert loop.submit(lambda b: b is buffer).result(5) is True
        finally:
            loop.stop()
            watcher.stop()


def test_a_burst_of_events_is_ingested_in_few_batches(tmp_path, store):
    reader = AtomicGuardSource("ag", store)
    watcher = Watcher([store])
    batches = []
    with Buffer(tmp_path / "b.sqlite3") as buffer, Buffer(tmp_path / "b.sqlite3", readonly=True) as ro:
        quiet = []
        loop = IngestLoop(
            buffer,
            [reader],
            watcher,
            debounce=0.2,
            reconcile_interval=3600,
            on_ingest=lambda report: batches.append(report.new),
            on_quiet=lambda b: quiet.append(count(b)),
            quiet=0.5,
        )
        watcher.start()
        try:
            loop.reconcile()
            batches.clear()
            loop.start()
            for _ in range(20):
                write_artifact(store)
            assert wait(lambda: count(ro) == 122, timeout=3.0)
            # on_ingest runs once ingest returns, a moment after its last commit is visible
            assert wait(lambda: sum(batches) == 20, timeout=3.0), batches
            assert len(batches) <= 3, batches
            assert wait(lambda: quiet, timeout=3.0)
            time.sleep(0.7)
            assert quiet[-1] == 122 and len(quiet) <= 2, quiet  # once after the burst (and maybe the first scan)
        finally:
            loop.stop()
            watcher.stop()


def test_appended_jsonl_line_is_ingested_from_a_non_recursive_watch(tmp_path):
    from lorad.sources import JsonlSource

    logdir = tmp_path / "logs"
    (logdir / "deep").mkdir(parents=True)
    log = logdir / "feedback.jsonl"
    log.write_text("")
    reader = JsonlSource("fb", log)
    watcher = Watcher([(logdir, False)])
    with running(tmp_path, [reader], watcher, debounce=0.05, reconcile_interval=3600) as ro:
        with open(log, "a") as f:
            f.write('{"id": "a1", "prompt": "p", "completion": "c", "status": "accepted"}\n')
        assert wait(lambda: count(ro) == 1, timeout=2.0)
        events = watcher.events
        (logdir / "deep" / "other.txt").write_text("not watched")
        time.sleep(0.3)
        assert watcher.events == events  # subfolders are not watched


def test_a_directory_symlink_loop_in_the_store_ingests_nothing_twice(tmp_path, store):
    """`ln -s .. objects/zz/dirloop` while watching: the events name every artifact again
    through the loop; the buffer still holds each artifact once, under its own path."""
    reader = AtomicGuardSource("ag", store)
    watcher = Watcher([store])
    with running(tmp_path, [reader], watcher, debounce=0.05, reconcile_interval=3600, settle=0.2) as ro:
        first = chains(ro)
        before = watcher.events
        (store / "objects" / "zz").mkdir()
        (store / "objects" / "zz" / "dirloop").symlink_to("..")
        assert wait(lambda: watcher.events > before, timeout=2.0)
        for folder in (store / "objects" / "zz" / "dirloop").iterdir():  # touch every file through the loop
            for f in folder.iterdir():
                os.utime(f)
        artifact_id = write_artifact(store)
        assert wait(lambda: count(ro) == 103, timeout=2.0)
        time.sleep(0.6)  # the settle pass looks at every path once more
        rows = ro.conn.execute(
            "SELECT count(*), count(DISTINCT artifact_id), sum(locator LIKE '%dirloop%') FROM artifacts"
        ).fetchone()
        assert rows == (103, 103, 0)
        assert chains(ro) == {**first, "first_try": first.get("first_try", 0) + 1}  # no fake chains
        assert (
            ro.conn.execute("SELECT locator FROM artifacts WHERE artifact_id = ?", (artifact_id,)).fetchone()[0]
            == f"objects/{artifact_id[:2]}/{artifact_id}.json"
        )


@pytest.mark.parametrize("replace", ["rm -rf, then mkdir", "mv aside, then mkdir", "rm -rf and mkdir at once"])
def test_a_store_deleted_and_made_again_is_watched_again_at_once(tmp_path, store, replace):
    """inotify watched the old directory: the new one is watched (and scanned) within seconds,
    not at the next reconciliation."""
    reader = AtomicGuardSource("ag", store)
    watcher = Watcher([store])
    with running(tmp_path, [reader], watcher, debounce=0.05, reconcile_interval=3600) as ro:
        with capture_logs() as logs:
            if replace.startswith("rm"):
                shutil.rmtree(store)
            else:
                store.rename(store.with_name("old-store"))
            if "at once" not in replace:
                time.sleep(0.3)  # the loop notices the directory is gone
            store.mkdir()
            early = write_artifact(store)  # before the new watch, maybe: the rescan finds it
            assert wait(lambda: count(ro) == 103, timeout=3.0)
            t0 = time.monotonic()
            late = write_artifact(store)
            assert wait(lambda: count(ro) == 104, timeout=2.0)
            assert time.monotonic() - t0 < 2.0
        assert [e["path"] for e in logs if e["event"] == "source_rewatched"] == [str(store)]
        stored = {r[0] for r in ro.conn.execute("SELECT artifact_id FROM artifacts")}
        assert {early, late} <= stored
