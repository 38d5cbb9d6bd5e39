"""Pushed feedback in-process: a known id with other content is a conflict unless it is an update."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from lorad.buffer.store import Buffer
from lorad.daemon.feedback import FeedbackConflict, FeedbackRejected, write_feedback


def record(**kw) -> dict:
    return {"id": "fb1", "prompt": "Write add(a, b).", "completion": "def add(a, b): return a + b",
            "status": "accepted"} | kw


def stored(buffer) -> list[tuple]:
    return buffer.conn.execute("SELECT locator, status, content FROM artifacts WHERE source = 'feedback'").fetchall()


def test_a_different_record_under_a_known_id_is_refused_and_nothing_changes(tmp_path):
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        assert write_feedback(buffer, record())["result"] == "new"
        with capture_logs() as logs, pytest.raises(FeedbackConflict, match="conflicts with the record stored"):
            write_feedback(buffer, record(status="rejected"))
        assert stored(buffer) == [("fb1", "accepted", "def add(a, b): return a + b")]
        assert [e["event"] for e in logs] == ["feedback_conflict_refused"]


def test_the_same_record_sent_again_is_an_idempotent_success(tmp_path):
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        write_feedback(buffer, record())
        again = {"status": "accepted", "completion": "def add(a, b): return a + b", "prompt": "Write add(a, b).",
                 "id": "fb1"}  # the same record, its keys in another order
        assert write_feedback(buffer, again)["result"] == "unchanged"
        assert write_feedback(buffer, again, update=True)["result"] == "unchanged"


def test_an_update_replaces_the_stored_record(tmp_path):
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        write_feedback(buffer, record())
        r = write_feedback(buffer, record(status="rejected", completion="def add(a, b): return a - b"), update=True)
        assert (r["result"], r["status"]) == ("updated", "rejected")
        assert stored(buffer) == [("fb1", "rejected", "def add(a, b): return a - b")]
        assert write_feedback(buffer, record(id="fb2"), update=True)["result"] == "new"


def test_a_record_with_a_lone_surrogate_is_refused_with_a_reason(tmp_path):
    """It was "internal error: UnicodeEncodeError" (issue 23): a lone surrogate is not Unicode text."""
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        for bad in (record(prompt="Write add(a, b).\ud800"), record(feedback="\udfff"), record() | {"\ud800": 1}):
            with pytest.raises(FeedbackRejected, match="lone surrogate"):
                write_feedback(buffer, bad)
        assert stored(buffer) == []
        assert write_feedback(buffer, record(prompt="Write add(a, b). \U0001f600"))["result"] == "new"  # a pair is fine


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf"), 10 ** 400])
def test_a_score_that_is_not_a_finite_number_is_refused_not_stored_as_rejected(tmp_path, score):
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        bad = {k: v for k, v in record(score=score).items() if k != "status"}
        with pytest.raises(FeedbackRejected, match="score: must be a finite number"):
            write_feedback(buffer, bad)
        assert stored(buffer) == []
