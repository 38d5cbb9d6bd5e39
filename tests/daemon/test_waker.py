"""The daemon never leaves a vLLM server asleep across its own restart: the waker thread, and a
real `lorad serve` started on a state whose record says a server is asleep (or was killed while
its worker trained beside a sleeping server)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from daemon_helpers import WORKER_ENV, training_sections, worker_processes

from lorad import config, events
from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Buffer
from lorad.cycle import training_lock
from lorad.daemon.waker import Waker
from lorad.release import gpu_share
from lorad.release.gpu_share import GpuShare, SleepingServer
from sleepy_vllm import SleepyVllm  # (tests/, on the path through tests/conftest.py)


def record_asleep(state: Path, url: str, **server) -> None:
    """What a daemon killed while its worker trained leaves in the buffer."""
    state.mkdir(parents=True, exist_ok=True)
    with Buffer(state / "buffer.sqlite3") as buffer:
        GpuShare([], JobStore(buffer.conn))._record(SleepingServer(url, **server), "asleep", "job-killed")


def records(state: Path) -> list[dict]:
    with Buffer(state / "buffer.sqlite3", readonly=True) as buffer:
        return gpu_share.records(JobStore(buffer.conn))


def sleeping_hook(url: str) -> str:
    """A config's [[publish]] table for a vLLM server that sleeps during training."""
    return (
        f'[[publish]]\nkind = "vllm"\nurl = "{url}"\nretries = 1\nbackoff = 0.0\ntimeout = 5.0\n'
        f"sleep_during_training = true\n"
    )


def start_with_hook(daemon_factory, url: str, **kw):
    d = daemon_factory(start=False, **kw)
    d.config.write_text(d.config.read_text() + sleeping_hook(url))
    return d.start()


def test_the_waker_retries_until_the_server_wakes_and_never_beside_a_running_cycle(tmp_path):
    s = config.loads(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    with SleepyVllm(sleeping=True, wake_failures=3) as fake:
        record_asleep(s.state_dir, fake.url, retries=0, backoff=0.0)
        with training_lock(s.state_dir, "a cycle in the test"):
            waker = Waker(s, retry_every=0.05)
            waker.start()
            time.sleep(0.5)
            assert fake.calls() == []  # a worker may be training: the cycle wakes them itself
        deadline = time.monotonic() + 10
        while fake.sleeping and time.monotonic() < deadline:
            time.sleep(0.05)
        waker.stop()
        assert not fake.sleeping
        assert fake.calls().count("POST /wake_up") == 4  # three refused rounds, then awake
        assert records(s.state_dir) == []


def test_the_waker_outlives_an_exception_in_a_round_and_keeps_retrying(tmp_path, monkeypatch):
    """Whatever a round raises (here a bug in the wake itself), it is logged and the thread goes
    on: the next round wakes the server."""
    from structlog.testing import capture_logs

    s = config.loads(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    real, rounds = GpuShare.wake_recorded, []

    def flaky(self):
        rounds.append(time.monotonic())
        if len(rounds) == 1:
            raise RuntimeError("a reply no parser expected")
        return real(self)

    monkeypatch.setattr(GpuShare, "wake_recorded", flaky)
    with SleepyVllm(sleeping=True) as fake:
        record_asleep(s.state_dir, fake.url, retries=0, backoff=0.0)
        waker = Waker(s, retry_every=0.05)
        with capture_logs() as logs:
            waker.start()
            deadline = time.monotonic() + 10
            while fake.sleeping and time.monotonic() < deadline:
                time.sleep(0.05)
            alive = waker.is_alive()
            waker.stop()
        assert alive and not fake.sleeping and len(rounds) >= 2
        [failed] = [e for e in logs if e["event"] == events.WAKER_ROUND_FAILED]
        assert failed["log_level"] == "error" and "a reply no parser expected" in failed["error"]
        assert records(s.state_dir) == []


def test_a_daemon_started_on_a_record_of_a_sleeping_server_wakes_it(daemon_factory, short_root):
    with SleepyVllm(sleeping=True) as fake:
        record_asleep(short_root / "state", fake.url, retries=1, backoff=0.0)
        d = start_with_hook(daemon_factory, fake.url)
        d.wait_for(lambda: not fake.sleeping, what="the server woken")
        d.wait_for(
            lambda: (
                d.request("status")["gpu_share"]
                == [{"url": fake.url, "state": "awake", "since": None, "job_id": None, "error": None}]
            ),
            what="status awake",
        )
        assert [e for e in d.events() if e.get("event") == events.SERVER_WOKEN][0]["url"] == fake.url
        out = d.cli("status")
        assert f"vllm {fake.url}: awake" in out.stdout
        assert records(short_root / "state") == []


def test_a_server_that_will_not_wake_is_shown_loudly_in_status_and_the_audit(daemon_factory, short_root):
    with SleepyVllm(sleeping=True, wake_failures=-1) as fake:
        record_asleep(short_root / "state", fake.url, retries=1, backoff=0.0)
        d = start_with_hook(daemon_factory, fake.url)
        server = d.wait_for(
            lambda: [x for x in d.request("status")["gpu_share"] if x["state"] == "wake_failed"],
            what="wake_failed in status",
        )[0]
        assert "HTTP 503" in server["error"] and server["job_id"] == "job-killed"
        out = d.cli("status")
        assert f"vllm {fake.url}: WARNING still asleep" in out.stdout and "HTTP 503" in out.stdout
        [logged] = [e for e in d.events() if e.get("event") == events.SERVER_WAKE_FAILED][:1]
        assert logged["level"] == "error"
        with Buffer(short_root / "state" / "buffer.sqlite3", readonly=True) as buffer:
            assert buffer.events(events.SERVER_WAKE_FAILED)[0]["detail"]["url"] == fake.url
        fake.wake_failures = 0  # the server answers again: the next round (30 s) would wake it
        d.stop()


def test_a_daemon_killed_while_its_worker_trains_beside_a_sleeping_server_wakes_it_at_restart(
    daemon_factory, short_root, store, tiny_model
):
    """SIGKILL leaves the worker running (its own process group) and the server asleep; the next
    daemon stops the orphaned worker first, then wakes the server, then resumes the job."""
    with SleepyVllm() as fake:
        sections = training_sections(tiny_model, max_steps=5000, save_steps=5000, min_new_examples=1)
        d = start_with_hook(daemon_factory, fake.url, env=WORKER_ENV, **sections)
        # in its steps (its SIGTERM handler installed: stopped at restart in a step, not after 30 s)
        job = d.wait_for(
            lambda: (
                ((d.request("status")["job"] or {}).get("progress") or {}).get("step")
                and fake.sleeping
                and d.request("status")["job"]
            ),
            timeout=120,
            what="training asleep",
        )
        job_dir = short_root / "state" / "jobs" / job["job_id"]
        assert worker_processes(job_dir)
        d.stop(signal.SIGKILL)
        assert fake.sleeping and worker_processes(job_dir)  # left behind: the worker, the record
        assert records(short_root / "state")[0]["state"] == "asleep"

        fake.log.clear()
        d.start(wait=False)
        d.wait_ready(timeout=90)  # recover() waits for the orphan to checkpoint and exit
        d.wait_for(lambda: "POST /wake_up" in fake.calls(), timeout=60, what="the wake at restart")
        d.wait_for(lambda: events.SERVER_WOKEN in [e.get("event") for e in d.events()], what="server_woken")
        names = [e.get("event") for e in d.events()]  # both runs' logs; the first never woke it
        # the orphaned worker was stopped before the server was woken (never awake beside it)
        assert names.index(events.ORPHAN_WORKER_STOPPED) < names.index(events.SERVER_WOKEN)
        d.request("cancel", job_id=job["job_id"])
        d.wait_for(
            lambda: d.request("job", job_id=job["job_id"])["job"]["state"] == "cancelled",
            timeout=120,
            what="the resumed job cancelled",
        )
        d.wait_for(lambda: not fake.sleeping, timeout=30, what="awake after the cancel")
        assert records(short_root / "state") == []
