"""SIGKILL the daemon at random moments while artifacts stream into the store.

Whatever moment the kill lands on (start-up migrations, the reconciliation scan, a batch
commit, an examples refresh), the next start must catch up: after the last restart every
artifact file in the store is in the buffer exactly once and SQLite's integrity check passes.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
from daemon_helpers import write_artifact

KILLS = 50


def kill(d) -> None:
    d.proc.kill()
    d.proc.wait(30)
    d._log.close()
    d.proc = None


class Streamer(threading.Thread):
    """Writes artifact files into the store the way AtomicGuard does, until stopped: single
    accepted attempts and refined chains (rejected, then accepted pointing back at it)."""

    def __init__(self, store: Path, seed: int):
        super().__init__(name="artifact-streamer", daemon=True)
        self.store, self.rng = store, random.Random(seed)
        self.stop = threading.Event()
        self.written: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            workflow = str(uuid.uuid4())
            if self.rng.random() < 0.5:
                self.written.append(write_artifact(self.store, workflow_id=workflow))
            else:
                first = write_artifact(
                    self.store,
                    workflow_id=workflow,
                    status="rejected",
                    content="def f(x):\n    return x\n",
                    feedback="expected 2, got 1",
                )
                self.written.append(first)
                self.written.append(
                    write_artifact(
                        self.store,
                        workflow_id=workflow,
                        attempt=2,
                        previous=first,
                        feedback_history=[[first, "expected 2, got 1"]],
                    )
                )
            time.sleep(self.rng.uniform(0.0, 0.03))


def store_ids(store: Path) -> set[str]:
    return {json.loads(p.read_text())["artifact_id"] for p in (store / "objects").rglob("*.json")}


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_every_artifact_is_buffered_exactly_once_after_fifty_random_sigkills(daemon_factory, store):
    rng = random.Random(7)
    d = daemon_factory(start=False, daemon={}, schedule={"reconcile_interval": 2})
    streamer = Streamer(store, seed=11)
    streamer.start()
    kills_before_ready = 0
    try:
        for _ in range(KILLS):
            d.start(wait=False)
            if rng.random() < 0.5:
                # During start-up: imports, migrations, the reconciliation scan, the first refresh.
                time.sleep(rng.uniform(0.1, 1.2))
            else:
                # While serving: watcher batches and examples refreshes of the streamed files.
                d.wait_ready(timeout=60)
                time.sleep(rng.uniform(0.0, 0.4))
            if d.proc.poll() is not None:
                raise AssertionError(f"daemon exited by itself with {d.proc.returncode}:\n{d.log_text()[-3000:]}")
            kills_before_ready += not any(e.get("event") == "daemon_started" for e in d.events())
            kill(d)
            d.log_path.write_text("")  # keep the log to the last run only
    finally:
        streamer.stop.set()
        streamer.join(10)

    d.start()  # ready only after the reconciliation scan has caught up
    expected = store_ids(store)
    assert len(expected) == 102 + len(streamer.written)
    d.wait_for(
        lambda: d.request("status")["buffer"]["artifacts"] == len(expected),
        timeout=60,
        what="the buffer to hold every artifact",
    )
    d.stop()

    with sqlite3.connect(d.root / "state" / "buffer.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = db.execute("SELECT artifact_id, COUNT(*) FROM artifacts GROUP BY artifact_id").fetchall()
        dupes = [a for a, n in rows if n != 1]
        assert not dupes, f"{len(dupes)} artifacts buffered more than once"
        assert {a for a, _ in rows} == expected
        assert db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0
        # Every refined chain the streamer wrote is linked: its accepted attempt points at its chain.
        unlinked = db.execute("SELECT COUNT(*) FROM artifacts WHERE chain_id IS NULL").fetchone()[0]
        assert unlinked == 0
    # The kills really landed at different moments: some before the daemon was ready, some after.
    assert 0 < kills_before_ready < KILLS, kills_before_ready
