"""One training cycle at a time per state directory."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from lorad.cycle.outcome import CycleError
from lorad.state import StateDir


class TrainingBusy(CycleError):
    "Another training cycle (the daemon's, or a `lorad train`) is running on this state directory."


@contextmanager
def training_lock(state_dir, holder: str):
    """Hold ``<state_dir>/training.lock`` for one cycle, or raise TrainingBusy at once.

    The daemon's jobs and ``lorad train`` both take it, so two cycles never train side by side
    (on one GPU, the second would run out of memory). The lock is an flock on an open file: it
    goes with the process that held it, however that process ends.

    Args:
        holder: who holds it, written into the file for the one that finds it taken.
    """
    path = StateDir(Path(state_dir)).training_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "holder unknown"
            raise TrainingBusy(f"another training cycle is running: {who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}, pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
