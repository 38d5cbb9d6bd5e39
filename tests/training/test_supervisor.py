"""supervisor.stop_orphan: a worker that outlived its parent is stopped (SIGTERM, then SIGKILL),
and a pid that now belongs to another process is never signalled.

Real processes: a sleeping Python started the way the supervisor starts a worker (a session of
its own, the job directory in its argv), or without the job directory for a reused pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from lorad.training import supervisor

IGNORE_TERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
# A grandchild in the worker's process group (as accelerate's ranks are) that ignores SIGTERM
# too; its pid is printed once it does.
WITH_CHILD = (
    "import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', "
    f'"{IGNORE_TERM}print(flush=True); import time; time.sleep(60)"], stdout=subprocess.PIPE); '
    "c.stdout.readline(); print(c.pid, flush=True); "
)


@pytest.fixture
def spawn():
    """spawn(code, *argv) -> a Python process running ``code`` in a session of its own, once it
    has printed "ready". Whatever is left of its process group is killed afterwards."""
    started: list[subprocess.Popen] = []

    def start(code: str, *argv) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", code + "print('ready', flush=True); import time; time.sleep(60)", *map(str, argv)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(proc)
        proc.lines = []
        while (line := proc.stdout.readline().strip()) != "ready":
            assert line, f"the process ended before it was ready (exit {proc.wait()})"
            proc.lines.append(line)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        proc.stdout.close()


def worker_of(job_dir, proc: subprocess.Popen) -> None:
    (job_dir / supervisor.WORKER_PID).write_text(f"{proc.pid}\n")


def test_an_orphan_worker_naming_the_job_dir_is_stopped_with_sigterm(tmp_path, spawn):
    worker = spawn("", tmp_path)
    worker_of(tmp_path, worker)
    assert supervisor.stop_orphan(tmp_path, timeout=10) is True
    assert worker.wait(5) == -signal.SIGTERM  # asked to checkpoint and pause, not killed


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout_with_its_process_group(tmp_path, spawn):
    worker = spawn(IGNORE_TERM + WITH_CHILD, "--launch", tmp_path)
    grandchild = psutil.Process(int(worker.lines[0]))
    worker_of(tmp_path, worker)
    started = time.monotonic()
    assert supervisor.stop_orphan(tmp_path, timeout=0.5) is True
    assert time.monotonic() - started >= 0.5  # SIGTERM had its time first
    assert worker.wait(5) == -signal.SIGKILL
    grandchild.wait(5)  # the rank the worker started went with it (NoSuchProcess-safe)
    assert not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("argv", [[], ["--other-job"]], ids=["no job dir", "another job dir"])
def test_a_pid_reused_by_a_process_not_naming_the_job_dir_is_never_signalled(tmp_path, spawn, argv):
    """The pid file outlived its worker and the pid went to another process: leave it alone."""
    job_dir, other = tmp_path / "job-a", tmp_path / "job-b"
    job_dir.mkdir()
    stranger = spawn("", *([other] if argv else []))
    worker_of(job_dir, stranger)
    assert supervisor.stop_orphan(job_dir, timeout=0.5) is False
    time.sleep(0.3)  # a signal sent would have landed by now
    assert stranger.poll() is None


def test_no_pid_file_or_a_pid_no_longer_running_is_no_orphan(tmp_path):
    assert supervisor.stop_orphan(tmp_path, timeout=0.5) is False
    gone = subprocess.Popen([sys.executable, "-c", "pass", str(tmp_path)])
    gone.wait(10)
    worker_of(tmp_path, gone)
    assert supervisor.stop_orphan(tmp_path, timeout=0.5) is False


def test_a_rank_that_outlives_the_worker_on_sigterm_is_killed_too(tmp_path, spawn):
    """stop_orphan watched only the worker: once it exited on SIGTERM, the rank was left running."""
    worker = spawn(WITH_CHILD, tmp_path)
    rank = psutil.Process(int(worker.lines[0]))
    worker_of(tmp_path, worker)
    assert supervisor.stop_orphan(tmp_path, timeout=0.5) is True
    assert worker.wait(5) == -signal.SIGTERM
    try:
        rank.wait(6)  # SIGKILL after the timeout, as for the worker itself
    except psutil.TimeoutExpired:
        pass
    assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE
