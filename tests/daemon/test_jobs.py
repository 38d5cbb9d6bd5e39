"""Training jobs driven by the daemon subprocess on a tiny model: promotion, cancel, pause/resume, shutdown."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from daemon_helpers import WORKER_ENV, config_text, training_sections, worker_processes


def job(d, job_id: str) -> dict:
    return d.request("job", job_id=job_id)["job"]


def at_step(d, job_id: str, step: int):
    def check():
        j = job(d, job_id)
        p = j.get("progress") or {}
        return j if j["state"] == "training" and (p.get("step") or 0) >= step else None

    return check


def closed_window_now() -> str:
    """A one-minute window twelve hours away: closed now."""
    start = datetime.now(timezone.utc) + timedelta(hours=12)
    end = start + timedelta(minutes=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_train_now_runs_a_tiny_job_to_promotion_and_current_moves(daemon_factory, tiny_model):
    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model))
    assert d.request("status")["active_version"] is None
    r = d.cli("train-now", "--wait", "--json", timeout=300)
    assert r.returncode == 0, r.stderr + d.log_text()[-3000:]
    done = json.loads(r.stdout)["job"]
    assert done["state"] == "promoted", done
    assert [e["state"] for e in done["events"]] == ["queued", "preparing", "training", "evaluating", "promoted"]
    current = d.root / "state" / "adapters" / "current"
    assert os.readlink(current) == done["version"]
    status = d.request("status")
    assert status.get("active_version") == done["version"], (status, d.log_text()[-4000:])
    assert status["buffer"]["new_examples"] == 0  # everything new went into that version
    assert status["torch_loaded"] is False  # the worker trained; the daemon never imported torch
    listed = json.loads(d.cli("jobs", "--json").stdout)["jobs"]
    assert listed[0]["job_id"] == done["job_id"] and listed[0]["state"] == "promoted"
    assert not worker_processes(done["job_dir"])
    assert not Path(done["job_dir"], "checkpoints").exists()  # only a resume needed them
    assert Path(done["job_dir"], "progress.jsonl").is_file()


def test_cancel_stops_a_running_job_cleanly(daemon_factory, tiny_model):
    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model, max_steps=5000, save_steps=1000))
    job_id = d.request("train_now")["job"]["job_id"]
    running = d.wait_for(at_step(d, job_id, 2), timeout=120, what="training to start")
    r = d.cli("cancel", job_id)
    assert r.returncode == 0, r.stderr
    ended = d.wait_for(lambda: (j := job(d, job_id))["state"] == "cancelled" and j, timeout=60, what="cancelled")
    assert ended["reason"] == "cancelled by request"
    assert not worker_processes(running["job_dir"])
    assert d.request("status")["active_version"] is None
    assert d.cli("cancel", job_id).returncode == 1  # already ended


def test_job_pauses_at_window_end_and_resumes_in_the_next_window(daemon_factory, tiny_model):
    sections = training_sections(tiny_model, max_steps=120, save_steps=1000, min_new_examples=1)
    d = daemon_factory(env=WORKER_ENV, **sections)
    first = d.wait_for(lambda: d.request("jobs")["jobs"], timeout=10, what="a scheduled job")[0]
    assert first["trigger"] == "window"
    job_id = first["job_id"]
    d.wait_for(at_step(d, job_id, 3), timeout=120, what="training to start")
    open_config = d.config.read_text()
    d.config.write_text(open_config.replace('"00:00-24:00"', json.dumps(closed_window_now())))
    assert d.cli("reload").returncode == 0
    paused = d.wait_for(lambda: (j := job(d, job_id))["state"] == "paused" and j, timeout=60, what="pause")
    assert paused["reason"] == "training window closed"
    checkpoints = sorted(Path(paused["job_dir"], "checkpoints").iterdir())
    assert checkpoints, "a paused job keeps a checkpoint"
    paused_step = paused["progress"]["step"]
    assert not worker_processes(paused["job_dir"])
    assert d.request("status")["job"] is None

    d.config.write_text(open_config)  # the next window opens
    assert d.cli("reload").returncode == 0
    ended = d.wait_for(
        lambda: (j := job(d, job_id))["state"] in ("promoted", "rejected", "failed") and j,
        timeout=240,
        what="the resumed job to finish",
    )
    assert ended["state"] == "promoted", ended
    assert ended["runs"] == 2
    progress = [json.loads(line) for line in Path(paused["job_dir"], "progress.jsonl").read_text().splitlines()]
    resumed = [p for p in progress if p.get("resumed")]
    assert resumed and resumed[0]["step"] >= paused_step - 1  # continued from its checkpoint, not from 0
    states = [e["state"] for e in ended["events"]]
    assert states == ["queued", "preparing", "training", "paused", "training", "evaluating", "promoted"]


def test_sigterm_pauses_the_running_job_and_leaves_no_orphan_worker(daemon_factory, tiny_model):
    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model, max_steps=5000, save_steps=1000))
    job_id = d.request("train_now")["job"]["job_id"]
    running = d.wait_for(at_step(d, job_id, 2), timeout=120, what="training to start")
    workers = worker_processes(running["job_dir"])
    assert workers
    assert d.stop() == 0
    assert not worker_processes(running["job_dir"])
    d.start()  # a manual job paused by shutdown resumes at once
    resumed = d.wait_for(
        lambda: (j := job(d, job_id))["state"] == "training" and j["runs"] == 2 and j,
        timeout=60,
        what="resume after restart",
    )
    assert [e["state"] for e in resumed["events"]][-2:] == ["paused", "training"]
    assert d.cli("cancel", job_id).returncode == 0
    d.wait_for(lambda: job(d, job_id)["state"] == "cancelled", timeout=60, what="cancelled")


def test_failed_job_is_recorded_and_backs_off_window_jobs(daemon_factory, short_root):
    sections = training_sections(short_root / "no-such-model", min_new_examples=1)
    closed = closed_window_now()
    sections["schedule"].update(windows=[closed], backoff_initial=600.0)
    d = daemon_factory(env=WORKER_ENV, **sections)
    r = d.cli("train-now", "--wait", timeout=300)
    assert r.returncode == 1
    failed = d.request("jobs")["jobs"][0]
    assert failed["state"] == "failed" and "no-such-model" in failed["reason"]
    sched = d.wait_for(lambda: (s := d.request("status")["schedule"])["failures"] == 1 and s, what="backoff")
    assert sched["backoff_until"] > time.time() + 500
    d.config.write_text(d.config.read_text().replace(json.dumps(closed), '"00:00-24:00"'))
    assert d.cli("reload").returncode == 0
    d.wait_for(lambda: "backing off" in d.request("status")["schedule"]["decision"], what="back-off decision")
    assert len(d.request("jobs")["jobs"]) == 1  # the open window started nothing


def test_train_now_wait_ends_for_a_job_with_nothing_to_train_and_a_restart_leaves_it_skipped(
    daemon_factory, short_root
):
    """Issue 23, finding 4: the job stayed "preparing" (the jobs table refused "skipped"), so
    --wait never returned and every start paused, resumed and skipped it again."""
    d = daemon_factory(config=config_text(short_root, None))  # no source: nothing to train on
    r = d.cli("train-now", "--wait", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.split()[1]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"job {job_id}: skipped, nothing to train on (no training examples"), r.stdout
    listed = d.cli("jobs")
    assert f"{job_id}  skipped" in listed.stdout, listed.stdout
    before = job(d, job_id)
    assert [e["state"] for e in before["events"]] == ["queued", "preparing", "skipped"]
    assert not any(e.get("event") == "job_state_not_saved" for e in d.events())
    d.stop()
    d.start()
    d.wait_for(lambda: d.request("status")["schedule"]["decision"], what="a scheduler decision after the restart")
    assert job(d, job_id)["events"] == before["events"]
    assert not any(e.get("event") in ("job_paused", "job_resumed") for e in d.events())


def test_a_job_does_not_train_beside_a_train_once_and_says_why(daemon_factory, short_root):
    from lorad import config, cycle

    sections = training_sections(short_root / "never-loaded", min_new_examples=1)
    sections["schedule"].update(windows=[closed_window_now()])  # no job of its own meanwhile
    d = daemon_factory(env=WORKER_ENV, **sections)
    with cycle.training_lock(config.load(d.config).state_dir, "lorad train, job job-y"):
        r = d.cli("train-now", "--wait", timeout=120)
    assert r.returncode == 1
    failed = d.request("jobs")["jobs"][0]
    assert failed["state"] == "failed"
    assert failed["reason"].startswith("another training cycle is running: lorad train, job job-y, pid ")


def test_a_daemon_starting_beside_a_running_lorad_train_leaves_its_job_alone(daemon_factory, short_root):
    from lorad import config, cycle
    from lorad.buffer.job_table import JobStore
    from lorad.buffer.store import Buffer

    sections = training_sections(short_root / "never-loaded")
    sections["schedule"].update(windows=[closed_window_now()])  # a paused job stays paused
    d = daemon_factory(start=False, **sections)
    s = config.load(d.config)
    with Buffer(s.buffer_path) as buffer:  # a `lorad train` job, training
        store = JobStore(buffer.conn)
        job_id = store.create("cli")["job_id"]
        store.transition(job_id, "training", None)
    with cycle.training_lock(s.state_dir, f"lorad train, job {job_id}"):
        d.start()
        assert job(d, job_id)["state"] == "training"  # not taken for a dead daemon's job
        assert any(e.get("event") == "job_recovery_skipped" for e in d.events())
    d.stop()
    d.start()  # the lock is free now: the job is a dead process's, and becomes paused
    assert job(d, job_id)["state"] == "paused"


def test_sigterm_right_after_train_now_leaves_the_job_paused_not_failed(daemon_factory, tiny_model):
    """Whatever the job was doing (preparing, or a worker still importing torch), it is paused."""
    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model, max_steps=5000, save_steps=1000))
    job_id = d.request("train_now")["job"]["job_id"]
    d.wait_for(lambda: job(d, job_id)["state"] in ("preparing", "training"), what="the job to start")
    assert d.stop() == 0
    import sqlite3

    with sqlite3.connect(d.root / "state" / "buffer.sqlite3") as db:
        (state,) = db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    assert state == "paused"


def test_worker_that_outlived_a_killed_daemon_is_stopped_before_the_job_resumes(daemon_factory, tiny_model):
    import signal

    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model, max_steps=5000, save_steps=1000))
    job_id = d.request("train_now")["job"]["job_id"]
    running = d.wait_for(at_step(d, job_id, 2), timeout=120, what="training to start")
    orphans = worker_processes(running["job_dir"])
    assert orphans
    d.proc.send_signal(signal.SIGKILL)  # no chance to pause anything
    d.proc.wait(10)
    d._log.close()
    d.proc = None
    assert all(p.is_running() for p in orphans)  # the worker lives on in its own session
    d.start()
    d.wait_for(
        lambda: not any(p.is_running() and p.status() != "zombie" for p in orphans),
        timeout=60,
        what="the orphan worker to stop",
    )
    assert any(e.get("event") == "orphan_worker_stopped" for e in d.events())
    resumed = d.wait_for(
        lambda: (j := job(d, job_id))["state"] == "training" and j["runs"] == 2 and j,
        timeout=60,
        what="the job to resume with one new worker",
    )
    assert len(worker_processes(resumed["job_dir"])) >= 1
    assert d.cli("cancel", job_id).returncode == 0
    d.wait_for(lambda: job(d, job_id)["state"] == "cancelled", timeout=60, what="cancelled")
