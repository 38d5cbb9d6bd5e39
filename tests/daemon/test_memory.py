"""Giving memory back after a burst: SQLite's page cache emptied, freed heap returned."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import pytest

from lorad.buffer.store import Buffer
from lorad.daemon import memory

GLIBC = memory._LIBC is not None


def sqlite_memory_used() -> int:
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib.sqlite3_memory_used()


def test_release_empties_the_page_cache_a_full_read_filled(tmp_path):
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        with buffer.transaction() as conn:
            conn.executemany(
                "INSERT INTO audit (ts, event, detail) VALUES (?, 'e', ?)", [(i, "x" * 1000) for i in range(20_000)]
            )
        buffer.conn.execute("PRAGMA shrink_memory")
        base = sqlite_memory_used()
        assert buffer.conn.execute("SELECT sum(length(detail)) FROM audit").fetchone()[0] == 20_000_000
        filled = sqlite_memory_used()
        assert filled - base > 10 << 20  # the whole table is in the cache now
        memory.release([buffer.conn])
        assert sqlite_memory_used() - base < 2 << 20
        assert buffer.conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 20_000  # still usable


def test_release_survives_a_closed_connection(tmp_path):
    buffer = Buffer(tmp_path / "b.sqlite3")
    buffer.close()
    memory.release([buffer.conn])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_arena_limit_is_accepted_by_glibc():
    assert memory.limit_arenas(memory.ARENAS) is True


def test_the_ingest_loop_gives_the_page_cache_back_once_a_burst_is_over(tmp_path, store):
    from lorad.daemon.watcher import IngestLoop, Watcher
    from lorad.sources import AtomicGuardSource

    quiet = []
    watcher = Watcher([])
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        loop = IngestLoop(
            buffer,
            [AtomicGuardSource("ag", store)],
            watcher,
            reconcile_interval=3600,
            on_quiet=lambda b: quiet.append(sqlite_memory_used()),
            quiet=0.2,
        )
        watcher.start()
        try:
            loop.reconcile()
            with buffer.transaction() as conn:
                conn.executemany(
                    "INSERT INTO audit (ts, event, detail) VALUES (?, 'e', ?)", [(i, "x" * 1000) for i in range(20_000)]
                )
            loop.start()

            def burst(b):  # reads the whole table, as a scan reads every signature, and changes the buffer
                b.conn.execute("SELECT sum(length(detail)) FROM audit").fetchone()
                loop.mark_changed()

            loop.submit(burst).result(10)
            deadline = time.monotonic() + 5
            while not quiet and time.monotonic() < deadline:
                time.sleep(0.05)
            assert quiet and quiet[0] > 10 << 20  # the cache held the table when the burst ended
            while sqlite_memory_used() > quiet[0] - (8 << 20) and time.monotonic() < deadline + 5:
                time.sleep(0.05)  # released right after on_quiet returns
            assert sqlite_memory_used() < quiet[0] - (8 << 20)
        finally:
            loop.stop()
            watcher.stop()
