"""The jobs table as JobStore reads and writes it."""

from __future__ import annotations

import pytest

from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Buffer


@pytest.mark.parametrize("state", ["promoted", "rejected", "failed", "cancelled", "paused", "skipped"])
def test_every_state_a_cycle_ends_in_is_stored(state):
    """Each final state the pipeline reports is one the jobs table admits (a state it refuses
    left the job "preparing" for ever: issue 23, finding 4)."""
    from lorad.cycle import driver

    assert state in driver._FINAL_EVENTS
    with Buffer(":memory:") as b:
        store = JobStore(b.conn)
        job = store.create("manual")
        store.transition(job["job_id"], state, "why")
        stored = store.get(job["job_id"])
        assert stored["state"] == state and stored["reason"] == "why"
        assert (stored["finished_at"] is not None) == (state != "paused")


def test_a_limit_past_sqlites_integers_lists_every_job():
    """`jobs` with a limit of 10**20 was an OverflowError ("internal error" from the daemon)."""
    with Buffer(":memory:") as b:
        store = JobStore(b.conn)
        made = [store.create("manual", now=1000.0 + i)["job_id"] for i in range(3)]
        assert [j["job_id"] for j in store.list(10**20)] == made[::-1]
        assert [j["job_id"] for j in store.list(2)] == made[:0:-1]
