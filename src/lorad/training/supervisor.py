"""The training worker as a subprocess: start it, tail its progress, stop it, find its orphans.

The worker runs in its own process group (accelerate's ranks too), so a signal reaches every
process of the run at once; its pid is in ``<job_dir>/worker.pid`` while it runs, its output
in ``<job_dir>/worker.log``. SIGTERM asks it to checkpoint and pause (exit 75), SIGINT to
cancel (exit 76). Torch-free: the daemon and the CLI use this module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from lorad import events
from lorad.training.jobdir import RESULT_FILE, iter_progress, read_job, worker_command

WORKER_LOG = "worker.log"
WORKER_PID = "worker.pid"

log = structlog.get_logger()


def supervise(
    job_dir,
    stop: threading.Event | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    on_progress: Callable[[dict], None] | None = None,
    poll: float = 0.5,
) -> int:
    """Run the worker on ``job_dir`` to its end; returns its exit code.

    Args:
        stop: when set, the worker is asked to stop: SIGTERM (checkpoint and pause), or SIGINT
            (cancel) when ``cancel()`` returns true.
        on_progress: called with every progress record as it appears.
        poll: seconds between looks at progress.jsonl.

    Ctrl-C in the foreground cancels the worker the same way (SIGINT) and waits for it.
    result.json left by an earlier run is removed first: what it says afterwards is this run's.
    A worker that dies of a signal takes the rest of its process group with it.
    """
    job_dir = Path(job_dir)
    argv = worker_command(job_dir, read_job(job_dir))
    offset = 0
    signalled = False
    # An earlier run's result (a pause, say) says nothing about this one: a worker killed
    # before it writes its own must leave none, not the earlier run's reason.
    (job_dir / RESULT_FILE).unlink(missing_ok=True)
    with open(job_dir / WORKER_LOG, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    (job_dir / WORKER_PID).write_text(f"{proc.pid}\n")

    def tail():
        nonlocal offset
        for record, after in iter_progress(job_dir, offset):
            offset = after  # where the next tail resumes
            if on_progress is not None:
                on_progress(record)

    try:
        while True:
            try:
                code = proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                if not signalled:
                    _signal_group(proc.pid, signal.SIGINT)
                    signalled = True
                continue
            tail()
            if stop is not None and stop.is_set() and not signalled:
                _signal_group(proc.pid, signal.SIGINT if cancel is not None and cancel() else signal.SIGTERM)
                signalled = True
        tail()
        if code < 0:  # killed: what it started (accelerate's ranks, guard commands) goes too
            _signal_group(proc.pid, signal.SIGKILL)
    finally:
        (job_dir / WORKER_PID).unlink(missing_ok=True)
    return code


def kill(job_dir) -> bool:
    """SIGKILL the worker of ``job_dir`` (shutdown's last resort); True if there was one."""
    pid = _pid(Path(job_dir))
    return pid is not None and _signal_group(pid, signal.SIGKILL)


def stop_orphan(job_dir, timeout: float = 30.0) -> bool:
    """Stop a worker still running on ``job_dir`` without its parent, with its process group
    (accelerate's ranks, guard commands); True if there was one.

    SIGTERM first (it checkpoints and exits paused), SIGKILL after ``timeout`` to whatever of
    the group still runs, the worker gone or not. The pid is only signalled while its command
    line names the job directory (pids are reused); the group, once its leader is gone, only
    while a process that was in it then still is (the group's id is not reused while it has one).
    """
    job_dir = Path(job_dir)
    pid = _pid(job_dir)
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    if str(job_dir).encode() not in cmdline:
        return False
    run = _group(pid)  # the worker's processes, while its command line vouches for them
    log.warning(events.ORPHAN_WORKER_STOPPED, pid=pid, job_dir=str(job_dir))
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _running(pid, run) or not _signal_group(pid, sig):
            return True
        deadline = time.monotonic() + wait
        while _running(pid, run) and time.monotonic() < deadline:
            time.sleep(0.1)
    return True


def live_processes() -> Iterator[tuple[int, list[bytes]]]:
    """Every running process (zombies left out): its pid and the fields of /proc/PID/stat after
    "pid (comm) ", so that ``fields[0]`` is the state, ``[1]`` ppid, ``[2]`` pgrp, ``[3]`` session,
    ``[19]`` starttime (comm may hold spaces, so it is cut at its last parenthesis)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] != b"Z":
            yield int(name), fields


def _group(pgid: int) -> dict[int, int]:
    """The running processes of process group ``pgid``: pid -> start time.

    The start time (clock ticks after boot) tells a process from a later one given its pid.
    """
    return {pid: int(fields[19]) for pid, fields in live_processes() if int(fields[2]) == pgid}


def _running(pgid: int, run: dict[int, int]) -> bool:
    """Whether a process of ``run`` still runs in group ``pgid``: then the group is still the
    run's, and signalling it reaches no other program."""
    now = _group(pgid)
    return any(now.get(pid) == started for pid, started in run.items())


def _pid(job_dir: Path) -> int | None:
    try:
        return int((job_dir / WORKER_PID).read_text())
    except (OSError, ValueError):
        return None


def _signal_group(pid: int, sig: int) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
