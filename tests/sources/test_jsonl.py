"""The JSONL feedback-log reader: offsets, partial lines, truncation, rotation, bad lines."""

from __future__ import annotations

import json
import os

import pytest

from lorad.buffer.store import Buffer
from lorad.sources.base import ParseError
from lorad.sources.ingest import ingest
from lorad.sources.jsonl import JsonlSource, parse_record

KEY = "log"


def rec(i: int, **kw) -> dict:
    return {"id": f"r{i}", "prompt": f"task {i}", "completion": f"answer {i}", "status": "accepted"} | kw


def append(path, *records, raw: bytes | None = None) -> None:
    with open(path, "ab") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        if raw:
            f.write(raw)


def ids(buffer) -> list[str]:
    return [r["artifact_id"] for r in buffer.artifacts()]


def scan(buffer, path, **kw):
    return ingest(buffer, [JsonlSource(KEY, path, **kw)])


def test_resumes_at_the_committed_offset_after_a_restart(tmp_path):
    log = tmp_path / "feedback.jsonl"
    db = tmp_path / "b.sqlite3"
    append(log, rec(1), rec(2))
    with Buffer(db) as b:
        assert scan(b, log).new == 2
    append(log, rec(3))
    with Buffer(db) as b:  # a new process: only the state in the database carries over
        report = scan(b, log)
        assert (report.new, report.unchanged) == (1, 0)
        assert ids(b) == ["r1", "r2", "r3"]
        assert b.source_state(KEY)["offset"] == log.stat().st_size


def test_partial_last_line_waits_for_its_end(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    line = json.dumps(rec(2)).encode()
    append(log, rec(1), raw=line[:10])
    assert scan(buffer, log).new == 1
    assert scan(buffer, log).quarantined == 0
    append(log, raw=line[10:] + b"\n")
    assert scan(buffer, log).new == 1
    assert ids(buffer) == ["r1", "r2"]


def test_truncated_log_is_read_again_from_the_top(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1), rec(2), rec(3))
    scan(buffer, log)
    log.write_bytes(b"")  # copytruncate
    append(log, rec(4))
    report = scan(buffer, log)
    assert report.new == 1
    assert ids(buffer) == ["r1", "r2", "r3", "r4"]


def test_log_overwritten_in_place_with_different_head_is_reread(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1, prompt="x" * 50), rec(2))
    scan(buffer, log)
    with open(log, "r+b") as f:  # same inode, same size or larger, new content
        f.write(json.dumps(rec(9, prompt="y" * 50)).encode() + b"\n")
    report = scan(buffer, log)
    assert "r9" in ids(buffer)
    assert report.new >= 1


def test_rotation_finishes_the_old_file_then_reads_the_new_one(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1), rec(2))
    scan(buffer, log)
    append(log, rec(3))  # written after our last read, just before rotation
    os.rename(log, tmp_path / "feedback.jsonl.1")
    append(log, rec(4), rec(5))  # the new file
    report = scan(buffer, log)
    assert report.new == 3
    assert ids(buffer) == ["r1", "r2", "r3", "r4", "r5"]
    # and nothing is read twice afterwards
    assert scan(buffer, log).new == 0
    append(log, rec(6))
    assert scan(buffer, log).new == 1


def test_rotation_without_the_old_file_starts_the_new_one_at_zero(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1))
    scan(buffer, log)
    os.unlink(log)
    append(log, rec(2))
    assert scan(buffer, log).new == 1
    assert ids(buffer) == ["r1", "r2"]


def test_bad_lines_are_quarantined_and_reading_carries_on(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1), raw=b'{"id": "r2", nope}\n\xff\xfe garbage\n' + json.dumps({"id": "r3"}).encode() + b"\n")
    append(log, rec(4))
    report = scan(buffer, log)
    assert (report.new, report.quarantined) == (2, 3)
    reasons = [q["reason"] for q in buffer.quarantine()]
    assert any("malformed JSON" in r for r in reasons)
    assert any("not UTF-8" in r for r in reasons)
    assert any("completion: required" in r for r in reasons)
    assert all("@" in q["locator"] for q in buffer.quarantine())
    assert scan(buffer, log).quarantined == 0  # past them for good


def test_line_read_twice_changes_nothing(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1), rec(1))
    report = scan(buffer, log)
    assert (report.new, report.unchanged) == (1, 1)


def test_retries_link_through_parent_id_into_one_chain(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(
        log,
        rec(1, status="rejected", feedback="wrong"),
        rec(2, parent_id="r1", status="rejected"),
        rec(3, parent_id="r2"),
    )
    scan(buffer, log)
    rows = list(buffer.artifacts())
    assert len({r["chain_id"] for r in rows}) == 1
    assert [r["attempt_number"] for r in rows] == [1, 2, 3]
    assert buffer.counts()["chains_refined"] == 1


def test_score_and_messages_forms():
    row = parse_record(
        json.dumps(
            {
                "id": 7,
                "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Sum xs"}],
                "completion": "sum(xs)",
                "score": 0.8,
                "source": "human",
                "created_at": "2026-01-01T00:00:00Z",
            }
        ).encode(),
        source="s",
        score_threshold=0.5,
    )
    assert (row["artifact_id"], row["status"], row["score"]) == ("7", "accepted", 0.8)
    assert (row["specification"], row["constraints"], row["origin"]) == ("Sum xs", "Be terse.", "human")
    low = parse_record(
        json.dumps({"id": "x", "prompt": "p", "completion": "c", "score": 0.2}).encode(),
        source="s",
        score_threshold=0.5,
    )
    assert low["status"] == "rejected"


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "p", "completion": "c", "status": "accepted"}, "id: required"),
        ({"id": "a", "completion": "c", "status": "accepted"}, "prompt: required"),
        ({"id": "a", "prompt": "p", "completion": "c"}, "status: required"),
        ({"id": "a", "prompt": "p", "completion": "c", "status": "meh"}, "status: must be accepted or rejected"),
        ({"id": "a", "prompt": "p", "completion": "c", "score": "high"}, "score: must be a number"),
        ({"id": "a", "prompt": "p", "completion": 3, "status": "accepted"}, "completion: must be a string"),
        ({"id": "a", "messages": "hi", "completion": "c", "status": "accepted"}, "messages: must be an array"),
    ],
)
def test_each_bad_record_names_its_field(record, reason):
    with pytest.raises(ParseError, match=reason):
        parse_record(json.dumps(record).encode(), source="s")


def test_a_retry_of_a_parent_at_the_largest_attempt_number_is_refused(buffer, tmp_path):
    """Its attempt_number would be 2**63, past what SQLite stores: refused, not an OverflowError
    at the insert (which would stop the batch, scan after scan)."""
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1, attempt_number=2**63 - 1), rec(2, parent_id="r1"), rec(3))
    report = scan(buffer, log)
    assert ids(buffer) == ["r1", "r3"] and report.quarantined == 1
    assert "attempt_number: one past its parent's" in buffer.quarantine()[0]["reason"]


def test_only_events_naming_the_log_beside_it_start_a_read(tmp_path):
    log = tmp_path / "logs" / "feedback.jsonl"
    (tmp_path / "logs" / "deep").mkdir(parents=True)
    (tmp_path / "logs" / "loop").symlink_to(".")
    append(log, rec(1))
    reader = JsonlSource(KEY, log)
    with Buffer(tmp_path / "b.sqlite3") as buffer:
        others = [
            tmp_path / "logs" / "deep" / "feedback.jsonl",
            tmp_path / "logs" / "loop" / "feedback.jsonl",
            tmp_path / "feedback.jsonl",
        ]
        assert ingest(buffer, [reader], paths=[str(p) for p in others]).new == 0
        assert ingest(buffer, [reader], paths=[str(tmp_path / "logs" / "feedback.jsonl.1")]).new == 1


def copytruncate(log) -> None:
    """What logrotate's copytruncate does: copy the live file to .1, then cut it to 0 bytes."""
    rotated = log.parent / (log.name + ".1")
    rotated.unlink(missing_ok=True)
    rotated.write_bytes(log.read_bytes())
    with open(log, "r+b") as f:
        f.truncate(0)


def rename_rotate(log) -> None:
    rotated = log.parent / (log.name + ".1")
    os.replace(log, rotated)
    log.touch()


@pytest.mark.parametrize("rotate", [copytruncate, rename_rotate])
def test_rotation_under_a_steady_writer_loses_no_line_and_reads_none_twice(buffer, tmp_path, rotate):
    """9,000 lines, rotated every 1,500, scanned at random points between writes: every line
    lands once (the lines written between the last scan and a copytruncate live only in .1)."""
    import random

    log = tmp_path / "feedback.jsonl"
    log.touch()
    rng = random.Random(23)
    new = unchanged = 0
    for i in range(9000):
        append(log, rec(i))
        if i % 1500 == 1499:
            rotate(log)
        if rng.random() < 1 / 120:
            report = scan(buffer, log)
            new, unchanged = new + report.new, unchanged + report.unchanged
    report = scan(buffer, log)
    new, unchanged = new + report.new, unchanged + report.unchanged
    assert (new, unchanged) == (9000, 0)
    assert buffer.counts()["artifacts"] == 9000


def test_copytruncate_finishes_the_copy_from_the_committed_offset(buffer, tmp_path):
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1), rec(2))
    scan(buffer, log)
    append(log, rec(3))  # written after our last read, just before the copy
    copytruncate(log)
    append(log, rec(4))  # the writer goes on in the same, now empty, file
    report = scan(buffer, log)
    assert (report.new, report.unchanged) == (2, 0)
    assert ids(buffer) == ["r1", "r2", "r3", "r4"]
    append(log, rec(5))
    assert (scan(buffer, log).new, scan(buffer, log).new) == (1, 0)


def test_copytruncate_while_the_writer_refilled_past_the_offset(buffer, tmp_path):
    """The live file is longer than the committed offset again by the next scan: its head
    differs, so it is still a truncation, and the copy is finished first."""
    log = tmp_path / "feedback.jsonl"
    append(log, rec(1))
    scan(buffer, log)
    append(log, rec(2))
    copytruncate(log)
    append(log, *(rec(i) for i in range(10, 20)))
    report = scan(buffer, log)
    assert (report.new, report.unchanged) == (11, 0)


@pytest.mark.parametrize("rotate", [copytruncate, rename_rotate])
def test_a_scan_interrupted_while_finishing_a_rotated_file_resumes_inside_it(tmp_path, rotate):
    """The batches read from the rotated file commit where they are in it, so a restart
    half-way through finishes it rather than skipping to the live file."""
    log = tmp_path / "feedback.jsonl"
    db = tmp_path / "b.sqlite3"
    append(log, rec(0))
    with Buffer(db) as b:
        scan(b, log)
    append(log, *(rec(i) for i in range(1, 10)))
    rotate(log)
    append(log, rec(10))
    with Buffer(db) as b:
        batches = JsonlSource(KEY, log).scan(b, batch_size=3)
        b.write_batch(next(batches))  # three lines of the copy, then the process dies
        batches.close()
    with Buffer(db) as b:
        report = scan(b, log)
        assert (report.new, report.unchanged) == (7, 0)
        assert sorted(ids(b), key=lambda s: int(s[1:])) == [f"r{i}" for i in range(11)]
