"""A full disk under the daemon: during ingest, and during a training job's checkpoint save.

The state directory is a real 16 MiB tmpfs mounted by the test (this suite runs as root in CI),
filled to the last byte with a filler file. What must hold: the failure is logged with a clear
reason; status keeps answering; feedback acknowledged to a client is never lost (checked after
a SIGKILL and restart); once space is back, everything written meanwhile is ingested exactly
once; a job whose save hit the full disk fails with the reason and what serves is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from daemon_helpers import WORKER_ENV, training_sections, write_artifact


@pytest.fixture
def small_fs(short_root):
    """A 16 MiB tmpfs at short_root/state (a real filesystem that fills up)."""
    mount = short_root / "state"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0750", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here ({done.stderr.strip()}); the disk-full tests need root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(fs: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def feedback(d, i: int) -> dict:
    record = {
        "id": f"fb-{i}",
        "prompt": f"Write f{i}(x).",
        "completion": f"def f{i}(x):\n    return {i}",
        "status": "accepted",
    }
    try:
        return d.request("feedback", record=record, timeout=60)
    except Exception as e:  # noqa: BLE001 - an answer-less failure is acceptable; a false ack is not
        return {"ok": False, "error": repr(e)}


def stored_feedback(db_path: Path) -> set[str]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return {r[0] for r in db.execute("SELECT artifact_id FROM artifacts WHERE source = 'feedback'")}


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_disk_full_during_ingest_loses_nothing_acknowledged_and_status_keeps_answering(daemon_factory, small_fs, store):
    d = daemon_factory(schedule={"reconcile_interval": 2})
    acked = {a["id"] for i in range(5) if (a := feedback(d, i))["ok"]}
    assert len(acked) == 5

    filler = fill(small_fs)
    big = "x = 1\n" * 20000  # 120 kB per artifact: far more than any slack left
    written = [write_artifact(store, content=big + f"# {i}\n") for i in range(20)]
    d.wait_for(
        lambda: any(e.get("event") == "ingest_failed" for e in d.events()),
        timeout=30,
        what="the ingest failure to be logged",
    )
    failure = next(e for e in d.events() if e.get("event") == "ingest_failed")
    assert "full" in failure["error"].lower() or "space" in failure["error"].lower(), failure
    during = [feedback(d, i) for i in range(5, 10)]
    for a in during:
        if not a["ok"]:
            assert a["error"].strip()  # refused with a reason, not silently dropped
    acked |= {a["id"] for a in during if a["ok"]}
    for _ in range(20):
        status = d.request("status", timeout=10)
        assert status["ok"] and status["buffer"]["artifacts"] >= 102
    assert d.proc.poll() is None

    filler.unlink()  # space is back: the periodic reconciliation catches up
    expected = 102 + 5 + len(written) + len([a for a in during if a["ok"]])
    d.wait_for(
        lambda: d.request("status")["buffer"]["artifacts"] >= 102 + 5 + len(written),
        timeout=60,
        what="the artifacts written while the disk was full",
    )
    d.proc.kill()  # and nothing acknowledged was only in memory
    d.proc.wait(30)
    d._log.close()
    d.proc = None
    d.start()
    db = small_fs / "buffer.sqlite3"
    assert acked <= stored_feedback(db)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        ids = [r[0] for r in conn.execute("SELECT artifact_id FROM artifacts WHERE source != 'feedback'")]
    assert len(ids) == len(set(ids)) and set(written) <= set(ids)
    assert d.request("status")["buffer"]["artifacts"] >= expected - 5


@pytest.mark.faults
@pytest.mark.timeout(400)
def test_disk_full_during_a_checkpoint_save_fails_the_job_with_the_reason_and_serving_is_untouched(
    daemon_factory, small_fs, tiny_model
):
    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model, max_steps=400, save_steps=1))
    job_id = d.request("train_now")["job"]["job_id"]
    d.wait_for(
        lambda: (d.request("job", job_id=job_id)["job"].get("progress") or {}).get("step", 0) >= 2,
        timeout=180,
        what="training with a checkpoint every step",
    )
    filler = fill(small_fs)
    # The job's own row may not be writable on the full disk; the log and the daemon say why.
    failed = d.wait_for(
        lambda: next((e for e in d.events() if e.get("event") == "job_failed" and e.get("job_id") == job_id), None),
        timeout=120,
        what="the job to fail on the full disk",
    )
    assert "No space left on device" in failed["reason"] or "is full" in failed["reason"], failed["reason"]
    job = d.request("job", job_id=job_id)["job"]
    status = d.request("status")
    assert status["ok"] and status["active_version"] is None and not (small_fs / "adapters" / "current").exists()
    assert d.proc.poll() is None
    filler.unlink()
    # The checkpoints a resume would trust are all complete (the failed save left none half-made).
    from lorad.training.checkpoints import complete_checkpoints

    assert complete_checkpoints(Path(job["job_dir"]))
    for ckpt in complete_checkpoints(Path(job["job_dir"])):
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == int(ckpt.name[5:])
        assert (ckpt / "adapter_model.safetensors").stat().st_size > 0
    d.wait_for(lambda: d.request("status")["schedule"]["failures"] == 1, timeout=10, what="the failure counted")
    assert d.request("status")["job"] is None  # nothing runs; the daemon is healthy once space is back
    assert os.path.isdir(small_fs / "jobs" / job_id)
