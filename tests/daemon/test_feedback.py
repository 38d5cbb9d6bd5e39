"""Pushed feedback in-process: a known id with other content is a conflict unless it is an update."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from lorad.buffer.store import Buffer
from lorad.daemon.feedback import FeedbackConflict, FeedbackRejected, write_feedback


def record(**kw) -> dict:
    return {
        "id": "fb1",
        "prompt": "Write add(a, b).",
        "completion": "def add(a, b): return a + b",
        "status": "accepted",
    } | kw


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
        again = {
            "status": "accepted",
            "completion": "def add(a, b): return a + b",
            "prompt": "Write add(a, b).",
            "id": "fb1",
        }  # the same record, its keys in another order
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


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf"), 10**400])
def test_a_score_that_is_not_a_finite_number_is_refused_not_stored_as_rejected(tmp_path, score):
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        bad = {k: v for k, v in record(score=score).items() if k != "status"}
        with pytest.raises(FeedbackRejected, match="score: must be a finite number"):
            write_feedback(buffer, bad)
        assert stored(buffer) == []


def test_feedback_not_committed_in_time_is_answered_as_pending_and_the_client_exits_75(tmp_path, capsys):
    """The ingest thread busy past the daemon's wait (an examples refresh of large artifacts):
    the write stays queued and will commit, so the daemon says it may still be applied and
    `lorad feedback` exits 75, not 1 with "internal error: TimeoutError"."""
    import threading
    from concurrent.futures import Future

    from lorad.cli import main
    from lorad.daemon.control import Access, ControlServer
    from lorad.daemon.feedback import acknowledge

    sock = tmp_path / "s.sock"
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nsocket = "{sock}"\n')
    queued: Future = Future()
    server = ControlServer(sock, lambda r, p, gone: acknowledge(queued, 0.2), Access())
    server.start()
    try:
        code = main(["--config", str(config), "feedback", "--timeout", "5", '{"id": "x"}'])
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert code == 75, err
    assert "not committed within 0.2 s" in err and "may still be applied" in err
    assert not [t for t in threading.enumerate() if t.name.startswith("lorad-control")]


def test_acknowledge_passes_on_the_write_and_its_refusals():
    from concurrent.futures import Future

    from lorad.daemon.feedback import FeedbackConflict, FeedbackRejected, acknowledge

    done, conflict, rejected = Future(), Future(), Future()
    done.set_result({"ok": True, "id": "x"})
    conflict.set_exception(FeedbackConflict("conflicts"))
    rejected.set_exception(FeedbackRejected("refused: id"))
    assert acknowledge(done, 1) == {"ok": True, "id": "x"}
    assert acknowledge(conflict, 1) == {"ok": False, "error": "conflicts", "conflict": True}
    assert acknowledge(rejected, 1) == {"ok": False, "error": "refused: id"}
