"""The client commands' text output."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from lorad.commands.client import status_text
from lorad.commands.render import JobProgress, progress_line


def test_progress_line_shows_bar_step_loss_and_eta():
    line = progress_line(
        {
            "job_id": "job-1",
            "state": "training",
            "progress": {"step": 30, "total_steps": 120, "loss": 1.23456, "eta_s": 95},
        }
    )
    assert "job job-1: training" in line
    assert "[#######-----------------------]" in line and "25%" in line and "step 30/120" in line
    assert "loss 1.2346" in line and "ETA 1m 35s" in line


def test_progress_line_names_the_phase_of_an_sft_then_grpo_job():
    line = progress_line(
        {"job_id": "j", "state": "training", "progress": {"step": 2, "total_steps": 6, "phase": "grpo"}}
    )
    assert "step 2/6 of the grpo phase" in line


def test_progress_line_says_when_a_job_is_being_cancelled():
    line = progress_line({"job_id": "j", "state": "training", "stopping": "cancel", "progress": None})
    assert line == "job j: training (cancelling)"


def test_status_text_has_version_counts_job_and_next_window():
    now = datetime.now(timezone.utc)
    text = status_text(
        {
            "state": "idle",
            "pid": 7,
            "uptime_s": 3700,
            "active_version": "v0002-20261121T000000Z",
            "buffer": {"artifacts": 102, "chains": 40, "examples": 35, "new_examples": 4, "quarantined": 1},
            "job": None,
            "scheduling_paused": True,
            "next_window": {
                "start": (now + timedelta(hours=2)).isoformat(),
                "end": (now + timedelta(hours=6)).isoformat(),
                "open": False,
            },
            "schedule": {"decision": "scheduled training paused"},
        }
    )
    assert "up 1h 01m" in text
    assert "active version: v0002-20261121T000000Z" in text
    assert "102 artifacts in 40 chains, 35 examples, 1 quarantined" in text
    assert "examples: 4 added since the active version was trained" in text
    assert "job: none running" in text
    assert "next window:" in text and "opens in 1h 59m" in text
    assert "scheduled training: paused" in text


def test_status_text_says_which_count_the_scheduler_waits_for():
    """ "20 new since the active version" beside "scheduler: 0 new examples, waiting for 5" read as a
    contradiction: the two counts are named for what they count."""
    from lorad.daemon.schedule import decide

    d = decide(
        window_open=True,
        running=None,
        queued=[],
        paused=[],
        scheduling_paused=False,
        new_examples=0,
        min_new_examples=5,
        gpu_busy=None,
        now_ts=0.0,
        backoff_until=0.0,
    )
    text = status_text(
        {
            "state": "idle",
            "pid": 7,
            "uptime_s": 5,
            "active_version": "v0002-20261121T000000Z",
            "buffer": {
                "artifacts": 102,
                "chains": 40,
                "examples": 35,
                "new_examples": 20,
                "untrained_examples": 0,
                "quarantined": 1,
            },
            "job": None,
            "next_window": None,
            "schedule": {"decision": d.reason, "min_new_examples": 5},
        }
    )
    assert "102 artifacts in 40 chains, 35 examples, 1 quarantined" in text
    assert (
        "examples: 20 added since the active version was trained; 0 not yet trained on by any "
        "version (promoted or rejected)"
    ) in text
    assert "scheduler: waiting for 5 examples not yet trained on (0 so far)" in text
    assert "new examples" not in text


def test_status_text_warns_of_a_refused_registry_pointer():
    text = status_text(
        {
            "state": "idle",
            "pid": 7,
            "uptime_s": 5,
            "active_version": None,
            "buffer": {},
            "registry_problems": ["current is missing; the pointer log says v0002"],
            "job": None,
            "next_window": None,
            "schedule": {},
        }
    )
    assert "registry: WARNING current is missing; the pointer log says v0002" in text


def test_status_text_never_says_a_server_sleeps_for_a_job_that_is_not_running():
    """A record left "asleep" by a job that is gone (the process died before the wake) is a
    WARNING naming that job, not "asleep while job ... trains"."""
    server = {
        "url": "http://127.0.0.1:8000",
        "state": "asleep",
        "since": 1_800_000_000,
        "job_id": "20261201-a",
        "error": None,
    }
    base = {"state": "idle", "pid": 7, "uptime_s": 5, "active_version": None, "buffer": {}}
    gone = status_text({**base, "job": None, "gpu_share": [server]})
    assert "asleep while job" not in gone
    assert "vllm http://127.0.0.1:8000: WARNING still asleep" in gone and "job 20261201-a is not running" in gone
    training = status_text(
        {**base, "state": "training", "job": {"job_id": "20261201-a", "state": "training"}, "gpu_share": [server]}
    )
    assert "vllm http://127.0.0.1:8000: asleep while job 20261201-a trains" in training


def test_one_progress_renderer_prints_state_changes_and_every_few_steps_off_a_terminal():
    import io

    out = io.StringIO()
    view = JobProgress(out, every=5)
    job = {"job_id": "job-1", "state": "preparing", "progress": None}
    view.update(job)
    for step in range(0, 11):
        view.update(
            job | {"state": "training", "progress": {"step": step, "total_steps": 10, "loss": 1.0 / (step + 1)}}
        )
    view.update(job | {"state": "evaluating", "progress": {"step": 10, "total_steps": 10}})
    JobProgress(out).update({"stage": "training", "step": 3, "total_steps": 10})  # a bare record (lorad train)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  preparing" and lines[-2] == "  evaluating"
    assert [line.split("step ")[1].split("/")[0] for line in lines if "step " in line] == ["0", "5", "10", "3"]
    quiet = io.StringIO()
    JobProgress(quiet, enabled=False).update(job | {"state": "training", "progress": {"step": 1, "total_steps": 2}})
    JobProgress(quiet, lines=False).update(job | {"state": "training", "progress": {"step": 1, "total_steps": 2}})
    assert quiet.getvalue() == ""
