"""One schema, whichever command opens a buffer first."""

from __future__ import annotations

import sqlite3
import subprocess
import sys


def schema_of(path) -> set[tuple]:
    conn = sqlite3.connect(path)
    try:
        return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"))
    finally:
        conn.close()


def test_a_buffer_made_by_lorad_ingest_and_one_made_by_lorad_serve_have_identical_schemas(daemon_factory, short_root):
    d = daemon_factory()
    d.stop()
    by_serve = schema_of(short_root / "state" / "buffer.sqlite3")
    other = short_root / "ingest.toml"
    other.write_text(d.config.read_text().replace(str(short_root / "state"), str(short_root / "state-ingest")))
    # A fresh process that imports only what `lorad ingest` needs (the daemon's modules never load).
    done = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(other), "ingest"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    by_ingest = schema_of(short_root / "state-ingest" / "buffer.sqlite3")
    assert by_ingest == by_serve
    assert {name for kind, name, *_ in by_serve if kind == "table"} >= {"artifacts", "examples", "jobs", "job_events"}
