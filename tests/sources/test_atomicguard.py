"""The AtomicGuard reader on the real fixture store and on every kind of bad input."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lorad.demo import synthetic
from lorad.sources.atomicguard import AtomicGuardSource, parse_artifact
from lorad.sources.base import ParseError
from lorad.sources.ingest import ingest

KEY = "ag"


def scan(buffer, store, **kw):
    return ingest(buffer, [AtomicGuardSource(KEY, store, **kw)])


def fixture_objects(store: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (store / "objects").glob("*/*.json")}


def rows_by_id(buffer) -> dict[str, dict]:
    return {r["artifact_id"]: r for r in buffer.artifacts()}


def test_reads_every_artifact_of_the_real_store_with_its_fields(buffer, fixture_store):
    report = scan(buffer, fixture_store)
    objects = fixture_objects(fixture_store)
    rows = rows_by_id(buffer)
    assert report.new == len(objects) == 102
    assert report.quarantined == 0
    assert set(rows) == set(objects)
    for aid, obj in objects.items():
        row = rows[aid]
        assert row["workflow_id"] == obj["workflow_id"]
        assert row["action_pair_id"] == obj["action_pair_id"] == "g_coder"
        assert row["previous_attempt_id"] == obj["previous_attempt_id"]
        assert row["attempt_number"] == obj["attempt_number"]
        assert row["status"] == obj["status"]
        assert row["content"] == obj["content"]
        assert row["created_at"] == obj["created_at"]
        assert row["passed"] == int(obj["guard_result"]["passed"])
        assert row["feedback"] == obj["guard_result"]["feedback"]
        assert row["specification"] == obj["context"]["specification"]
        assert row["constraints"] == obj["context"]["constraints"]
        assert json.loads(row["feedback_history"]) == obj["context"]["feedback_history"]
        assert row["origin"] == "generated"  # absent in this store: generated


def test_links_the_real_store_into_its_retry_chains(buffer, fixture_store):
    scan(buffer, fixture_store)
    objects = fixture_objects(fixture_store)
    rows = rows_by_id(buffer)
    # Oracle: walk previous_attempt_id from every artifact to its first attempt.
    for aid, obj in objects.items():
        first = obj
        while first["previous_attempt_id"]:
            first = objects[first["previous_attempt_id"]]
        assert rows[aid]["chain_id"] == rows[first["artifact_id"]]["chain_id"]
    counts = buffer.counts()
    assert counts["chains"] == 40
    assert (counts["chains_first_try"], counts["chains_refined"], counts["chains_exhausted"]) == (10, 25, 5)
    accepted = buffer.conn.execute("SELECT count(*) FROM chains WHERE accepted_id IS NOT NULL").fetchone()[0]
    assert accepted == 35


def test_second_scan_of_an_unchanged_store_changes_nothing(buffer, fixture_store):
    scan(buffer, fixture_store)
    before = buffer.conn.execute("SELECT * FROM artifacts ORDER BY id").fetchall()
    report = scan(buffer, fixture_store)
    assert (report.new, report.updated, report.quarantined, report.unchanged) == (0, 0, 0, 102)
    assert buffer.conn.execute("SELECT * FROM artifacts ORDER BY id").fetchall() == before


def test_rewritten_artifact_updates_its_row_and_its_chain(buffer, tmp_path):
    store = tmp_path / "s"
    [a] = synthetic.chain(specification="Write f()", attempts=[("def f(): pass", "pending", "")])
    path = synthetic.write(store, a)
    scan(buffer, store)
    assert buffer.counts().get("chains_open") == 1
    a["status"] = "accepted"
    a["guard_result"] = {"passed": True, "feedback": "ok"}
    synthetic.write(store, a)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # same-second rewrite
    report = scan(buffer, store)
    assert (report.new, report.updated) == (0, 1)
    [row] = buffer.artifacts()
    assert row["status"] == "accepted" and row["passed"] == 1
    assert buffer.counts().get("chains_first_try") == 1


def test_touched_file_with_same_content_is_unchanged(buffer, fixture_store):
    scan(buffer, fixture_store)
    some = next((fixture_store / "objects").glob("*/*.json"))
    os.utime(some, ns=(time.time_ns(), time.time_ns()))
    report = scan(buffer, fixture_store)
    assert (report.new, report.updated, report.unchanged) == (0, 0, 102)


BAD_INPUTS = {
    "malformed": (b'{"artifact_id": "x", oops}', "malformed JSON"),
    "truncated": (b'{"artifact_id": "x", "content": "def f', "truncated JSON"),
    "garbage": (bytes(range(256)) * 4, "not UTF-8"),
    "wrong-type": (None, "attempt_number: must be an integer"),
    "missing-field": (None, "content: required field is missing"),
    "bad-status": (None, "status: must be one of"),
    "not-an-object": (b"[1, 2, 3]", "must be a JSON object"),
    "empty": (b"", "empty file"),
}


def _valid(aid: str) -> dict:
    return synthetic.artifact(workflow_id="w", content="x = 1", status="accepted", artifact_id=aid)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_artifact_is_quarantined_with_its_reason_and_ingest_carries_on(buffer, tmp_path, case):
    store = tmp_path / "s"
    synthetic.write(store, _valid("aa-good"))
    data, reason = BAD_INPUTS[case]
    if data is None:
        obj = _valid("bb-bad")
        if case == "wrong-type":
            obj["attempt_number"] = "two"
        elif case == "missing-field":
            del obj["content"]
        else:
            obj["status"] = "maybe"
        data = json.dumps(obj).encode()
    bad = store / "objects" / "bb" / "bb-bad.json"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(data)
    old = time.time() - 60
    os.utime(bad, (old, old))
    report = scan(buffer, store)
    assert report.new == 1 and report.quarantined == 1
    [q] = buffer.quarantine()
    assert q["locator"] == "objects/bb/bb-bad.json"
    assert reason in q["reason"]
    # Counted once: a rescan does not quarantine it again.
    assert scan(buffer, store).quarantined == 0
    assert buffer.counts()["quarantined"] == 1


def test_oversized_file_is_quarantined_unread(buffer, tmp_path):
    store = tmp_path / "s"
    obj = _valid("cc-big")
    obj["content"] = "x" * 5000
    synthetic.write(store, obj)
    report = scan(buffer, store, max_file_bytes=1000)
    assert report.quarantined == 1 and report.new == 0
    assert "over the 1000-byte limit" in buffer.quarantine()[0]["reason"]


def test_symlink_leading_outside_the_store_is_quarantined(buffer, tmp_path):
    store = tmp_path / "s"
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps(_valid("dd-out")))
    link = store / "objects" / "dd" / "dd-out.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    (store / "blobs").mkdir()
    (store / "blobs" / "ff.json").write_text(json.dumps(_valid("ff-blob")))
    (store / "objects" / "ff").mkdir()
    (store / "objects" / "ff" / "ff-blob.json").symlink_to(store / "blobs" / "ff.json")
    report = scan(buffer, store)
    assert report.quarantined == 1
    assert "symlink leads outside the store" in buffer.quarantine()[0]["reason"]
    assert report.new == 1  # a symlink to a file elsewhere inside the store is read
    again = scan(buffer, store)  # counted once: a rescan skips what it already judged
    assert (again.new, again.quarantined, again.unchanged) == (0, 0, 2)


def test_a_symlink_to_another_artifact_file_is_not_a_second_artifact(buffer, tmp_path):
    store = tmp_path / "s"
    inside = synthetic.write(store, _valid("ee-in"))
    (store / "objects" / "ee" / "ee-alias.json").symlink_to(inside)  # sorts first
    report = scan(buffer, store)
    assert (report.new, report.quarantined) == (1, 1)
    assert [r["locator"] for r in buffer.artifacts()] == ["objects/ee/ee-in.json"]
    assert buffer.quarantine()[0]["reason"] == "symlink to objects/ee/ee-in.json, which is read as itself"
    again = scan(buffer, store)
    assert (again.new, again.quarantined, again.unchanged) == (0, 0, 2)


def test_a_copy_of_an_artifact_under_another_name_is_stored_once(buffer, tmp_path):
    """Keyed by what the store says the artifact is (workflow and id), not by its path."""
    store = tmp_path / "s"
    original = synthetic.write(store, _valid("hh-one"))
    report = scan(buffer, store)
    copy = store / "objects" / "hh" / "hh-one-copy.json"
    copy.write_bytes(original.read_bytes())
    (store / "objects" / "ha").mkdir()
    (store / "objects" / "ha" / "hh-one.json").write_bytes(original.read_bytes())
    report = scan(buffer, store)
    assert (report.new, report.quarantined) == (0, 2)
    assert [r["locator"] for r in buffer.artifacts()] == ["objects/hh/hh-one.json"]
    assert {q["reason"] for q in buffer.quarantine()} == {
        "artifact hh-one is already stored from objects/hh/hh-one.json"
    }
    assert buffer.counts()["chains"] == 1
    again = scan(buffer, store)  # judged once, while the copies stay the same
    assert (again.new, again.quarantined, again.unchanged) == (0, 0, 3)


def test_event_paths_through_a_symlinked_folder_or_out_of_the_store_name_nothing(buffer, tmp_path):
    store = tmp_path / "s"
    path = synthetic.write(store, _valid("jj-one"))
    (store / "objects" / "zz").mkdir()
    (store / "objects" / "zz" / "loop").symlink_to("..")
    (store / "objects" / "jk").symlink_to("jj")
    outside = tmp_path / "elsewhere" / "objects" / "jj"
    outside.mkdir(parents=True)
    (outside / "jj-two.json").write_text(json.dumps(_valid("jj-two")))
    reader = AtomicGuardSource(KEY, store)
    through = [
        store / "objects" / "zz" / "loop" / "jj" / path.name,
        store / "objects" / "jk" / path.name,
        store / "objects" / "jj" / ".." / ".." / ".." / "elsewhere" / "objects" / "jj" / "jj-two.json",
        outside / "jj-two.json",
        store / "objects" / path.name,
    ]
    assert ingest(buffer, [reader], paths=[str(p) for p in through]).new == 0
    assert ingest(buffer, [reader], paths=[str(path)]).new == 1
    assert [r["locator"] for r in buffer.artifacts()] == ["objects/jj/jj-one.json"]


def test_a_fifo_or_a_folder_named_like_an_artifact_is_quarantined_not_waited_on(buffer, tmp_path):
    store = tmp_path / "s"
    synthetic.write(store, _valid("gg-good"))
    os.mkfifo(store / "objects" / "gg" / "gg-fifo.json")  # opening it to read would wait for a writer
    (store / "objects" / "gg" / "gg-folder.json").mkdir()

    def stuck(signum, frame):
        raise TimeoutError("the scan waited on the FIFO")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    try:
        report = scan(buffer, store)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert (report.new, report.quarantined) == (1, 2)
    assert {q["reason"] for q in buffer.quarantine()} == {"not a regular file"}
    again = scan(buffer, store)  # judged once, until they change
    assert (again.new, again.quarantined, again.unchanged) == (0, 0, 3)


def test_non_utf8_file_name_is_quarantined(buffer, tmp_path):
    store = tmp_path / "s"
    synthetic.write(store, _valid("ff-good"))
    folder = os.path.join(os.fsencode(store), b"objects", b"ff")
    with open(os.path.join(folder, b"bad-\xff\xfe.json"), "wb") as f:
        f.write(json.dumps(_valid("ff-bad")).encode())
    report = scan(buffer, store)
    assert report.new == 1 and report.quarantined == 1
    q = buffer.quarantine()[0]
    assert q["reason"] == "file name is not valid UTF-8"
    assert "\\xff" in q["locator"]
    again = scan(buffer, store)
    assert (again.new, again.quarantined, again.unchanged) == (0, 0, 2)


def test_quarantine_entries_of_files_that_no_longer_exist_are_dropped(buffer, tmp_path):
    """They were counted for ever (status, lorad ingest): issue 23. The full scan drops those it
    no longer finds; a watcher event for a deleted file drops its entry at once."""
    store = tmp_path / "s"
    synthetic.write(store, _valid("aa-good"))
    bad = []
    for name in ("bb-broken", "cc-broken", "dd-broken"):
        path = synthetic.object_path(store, name)
        path.parent.mkdir(parents=True)
        path.write_text('{"artifact_id": ')
        os.utime(path, (time.time() - 60, time.time() - 60))
        bad.append(path)
    folder = os.path.join(os.fsencode(store), b"objects", b"ee")
    os.mkdir(folder)
    undecodable = os.path.join(folder, b"bad-\xff.json")
    with open(undecodable, "wb") as f:
        f.write(json.dumps(_valid("ee-bad")).encode())
    assert scan(buffer, store).quarantined == 4
    bad[0].unlink()
    assert scan(buffer, store).quarantined == 0  # a full scan
    assert sorted(q["locator"] for q in buffer.quarantine()) == [
        "objects/cc/cc-broken.json",
        "objects/dd/dd-broken.json",
        "objects/ee/bad-\\xff.json",
    ]
    bad[1].unlink()
    ingest(buffer, [AtomicGuardSource(KEY, store)], paths=[str(bad[1])])  # the watcher's delete event
    os.unlink(undecodable)
    scan(buffer, store)
    assert [q["locator"] for q in buffer.quarantine()] == ["objects/dd/dd-broken.json"]
    assert buffer.counts()["quarantined"] == 1
    assert [r["artifact_id"] for r in buffer.artifacts()] == ["aa-good"]  # rows outlive their files


def test_file_caught_mid_write_is_retried_not_quarantined(buffer, tmp_path):
    store = tmp_path / "s"
    obj = _valid("ab-live")
    path = synthetic.object_path(store, obj["artifact_id"])
    path.parent.mkdir(parents=True)
    data = json.dumps(obj, indent=2).encode()
    path.write_bytes(data[: len(data) // 2])  # the writer is halfway through
    report = scan(buffer, store, settle_seconds=30)
    assert (report.new, report.quarantined) == (0, 0)
    path.write_bytes(data)  # the writer finishes
    report = scan(buffer, store, settle_seconds=30)
    assert (report.new, report.quarantined) == (1, 0)


def test_quarantined_file_rewritten_with_valid_content_gets_a_new_chance(buffer, tmp_path):
    store = tmp_path / "s"
    obj = _valid("ac-fix")
    path = synthetic.object_path(store, obj["artifact_id"])
    path.parent.mkdir(parents=True)
    path.write_text('{"artifact_id": "ac-fix", "content": ')
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert scan(buffer, store).quarantined == 1
    synthetic.write(store, obj)
    report = scan(buffer, store)
    assert report.new == 1
    assert buffer.quarantine() == []


def test_a_file_broken_and_then_restored_leaves_quarantine_and_is_not_read_again(buffer, tmp_path, monkeypatch):
    store = tmp_path / "s"
    path = synthetic.write(store, _valid("ac-back"))
    good = path.read_bytes()
    assert scan(buffer, store).new == 1
    path.write_text('{"artifact_id": "ac-back", "content": ')
    os.utime(path, (time.time() - 60, time.time() - 60))
    assert scan(buffer, store).quarantined == 1
    path.write_bytes(good)  # the same content the buffer holds
    report = scan(buffer, store)
    assert (report.new, report.updated, report.unchanged, report.quarantined) == (0, 0, 1, 0)
    assert buffer.quarantine() == []
    st = path.stat()
    assert buffer.file_signatures(KEY)["objects/" + path.parent.name + "/" + path.name][:2] == (
        st.st_size,
        st.st_mtime_ns,
    )
    from lorad.sources import atomicguard

    read = []
    monkeypatch.setattr(atomicguard, "_read", lambda *a: read.append(a) or good)
    assert scan(buffer, store).unchanged == 1 and read == []  # skipped on its signature


def test_reads_the_legacy_forms_atomicguard_still_reads():
    legacy = {
        "artifact_id": "legacy-1",
        "content": "def f(): return 1",
        "previous_attempt_id": None,
        "action_pair_id": "g_coder",
        "created_at": "2025-01-01T00:00:00",
        "attempt_number": 1,
        "status": "rejected",
        "guard_result": False,
        "feedback": "AssertionError: f() != 2",
        "context": {
            "specification": "Write f",
            "constraints": "",
            "feedback_history": [["old-1", "SyntaxError"]],
            "dependency_artifacts": [["g_plan", "plan-1"]],
        },
        "unknown_future_field": {"ignored": True},
    }
    row = parse_artifact(json.dumps(legacy).encode(), source="s", locator="l")
    assert row["passed"] == 0
    assert row["feedback"] == "AssertionError: f() != 2"
    assert row["workflow_id"] == ""  # older versions kept it only in index.json: the scan fills it in
    assert json.loads(row["feedback_history"]) == [{"artifact_id": "old-1", "feedback": "SyntaxError"}]
    assert json.loads(row["dependency_artifacts"]) == {"g_plan": "plan-1"}


def test_reads_source_metadata_and_pending_superseded_statuses():
    for status in ("pending", "superseded"):
        obj = synthetic.artifact(
            workflow_id="w", content="c", status=status, source="human", metadata={"adapter_version": "v0001"}
        )
        row = parse_artifact(json.dumps(obj).encode(), source="s", locator="l")
        assert row["status"] == status
        assert row["origin"] == "human"
        assert json.loads(row["metadata"]) == {"adapter_version": "v0001"}


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda o: o.update(source="robot"), "source: must be one of"),
        (lambda o: o.update(guard_result="yes"), "guard_result: must be an object or a boolean"),
        (lambda o: o.update(context=[]), "context: must be an object"),
        (lambda o: o.update(created_at="yesterday"), "created_at: not an ISO 8601 timestamp"),
        (lambda o: o.update(attempt_number=0), "attempt_number: must be an integer from 1 to"),
        (lambda o: o.update(artifact_id=""), "artifact_id: must not be empty"),
        (lambda o: o["context"].update(feedback_history=[{"artifact_id": 1}]), "feedback_history[0]"),
    ],
)
def test_each_schema_violation_names_the_field(mutate, reason):
    obj = synthetic.artifact(workflow_id="w", content="c", status="accepted")
    mutate(obj)
    with pytest.raises(ParseError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_artifact(json.dumps(obj).encode(), source="s", locator="l")


def test_repeated_unknown_ids_across_workflows_stay_apart(buffer, tmp_path):
    """Real stores hold artifacts whose ids repeat 'unknown' across workflows."""
    store = tmp_path / "s"
    for wf in ("w1", "w2"):
        obj = synthetic.artifact(workflow_id=wf, content=f"# {wf}", status="accepted", artifact_id="unknown")
        p = store / "objects" / "un" / f"unknown-{wf}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj))
    assert scan(buffer, store).new == 2
    assert buffer.counts()["chains"] == 2


def _store_of_chains(root: Path, chains: int) -> list[dict]:
    everything = []
    for t in range(chains):
        attempts = [(f"def f{t}(): return {k}", "rejected", f"f{t}() returned {k}") for k in range(t % 4)]
        attempts.append((f"def f{t}(): return 42", "accepted", ""))
        for a in synthetic.chain(specification=f"Write f{t}() returning 42.", attempts=attempts):
            synthetic.write(root, a)
            everything.append(a)
    synthetic.write_index(root, everything)
    return everything


def _stored(buffer) -> tuple[list, list]:
    skip = {"id", "ingested_at", "updated_at"}
    artifacts = sorted(tuple((k, v) for k, v in r.items() if k not in skip) for r in buffer.artifacts())
    chains = sorted(
        buffer.conn.execute(
            "SELECT chain_id, source, workflow_id, action_pair_id, attempts, rejected, outcome, specification, "
            "first_ts, last_ts, (SELECT locator FROM artifacts WHERE id = c.accepted_id) FROM chains c"
        ).fetchall()
    )
    return artifacts, chains


def test_worker_processes_store_exactly_what_one_process_stores(tmp_path, monkeypatch):
    from lorad.buffer.store import Buffer
    from lorad.sources import atomicguard, pool

    store = tmp_path / "store"
    _store_of_chains(store, 30)
    (store / "objects" / "zz").mkdir()
    (store / "objects" / "zz" / "broken.json").write_text('{"artifact_id": "broken", ')
    monkeypatch.setattr(atomicguard, "CHUNK_FILES", 7)  # the first chunk here, ten in workers

    def run(buffer):
        return ingest(buffer, [AtomicGuardSource(KEY, store, settle_seconds=0, parse_workers=2)], batch_size=10)

    monkeypatch.setattr(pool, "MIN_PARALLEL_FILES", 10**9)
    with Buffer(tmp_path / "one.sqlite3") as one:
        alone = run(one)
        expected = _stored(one)
    monkeypatch.setattr(pool, "MIN_PARALLEL_FILES", 1)
    with Buffer(tmp_path / "many.sqlite3") as many, capture_logs() as logs:
        helped = run(many)
        assert _stored(many) == expected
        assert run(many).unchanged == helped.new + 1
    assert (helped.new, helped.quarantined) == (alone.new, alone.quarantined) == (len(expected[0]), 1)
    # the workers did it, with no failure
    assert [e["event"] for e in logs if e["event"].startswith("parse_workers")] == ["parse_workers_started"]


def test_new_files_are_read_chain_by_chain_in_index_order(tmp_path, buffer):
    store = tmp_path / "store"
    written = _store_of_chains(store, 12)
    batches = list(AtomicGuardSource(KEY, store, settle_seconds=0).scan(buffer, batch_size=5))
    workflows = [row["workflow_id"] for batch in batches for row in batch.artifacts]
    assert len(workflows) == len(written)
    assert workflows == sorted(workflows)  # each chain's attempts one after another


def test_the_workflow_id_older_stores_keep_only_in_the_index_is_filled_in(tmp_path, buffer):
    store = tmp_path / "store"
    legacy = synthetic.chain(
        workflow_id="wf-in-index", specification="Write f", attempts=[("x", "rejected", "no"), ("y", "accepted", "")]
    )
    store.mkdir()
    synthetic.write_index(store, legacy)
    for a in legacy:
        del a["workflow_id"], a["context"]["workflow_id"]
        synthetic.write(store, a)
    report = scan(buffer, store)
    assert report.new == 2
    assert {r["workflow_id"] for r in buffer.artifacts()} == {"wf-in-index"}
    assert buffer.counts()["chains_refined"] == 1


def test_index_json_is_read_at_most_once_per_scan(tmp_path, buffer, monkeypatch):
    from lorad.sources import atomicguard

    store = tmp_path / "store"
    legacy = synthetic.chain(
        workflow_id="wf-in-index",
        specification="Write f",
        attempts=[("x", "rejected", "no"), ("y", "rejected", "no"), ("z", "accepted", "")],
    )
    store.mkdir()
    synthetic.write_index(store, legacy)
    for a in legacy:
        del a["workflow_id"], a["context"]["workflow_id"]
        synthetic.write(store, a)
    scan(buffer, store)
    for a in legacy:  # rewritten: the rescan reads each again, one chunk of known files at a time
        a["metadata"] = {"rewritten": True}
        synthetic.write(store, a)
    monkeypatch.setattr(atomicguard, "CHUNK_FILES", 1)
    reads = []
    real_index = AtomicGuardSource._index
    monkeypatch.setattr(AtomicGuardSource, "_index", lambda self: reads.append(1) or real_index(self))
    report = scan(buffer, store)
    assert report.updated == 3 and len(reads) == 1
    assert {r["workflow_id"] for r in buffer.artifacts()} == {"wf-in-index"}
