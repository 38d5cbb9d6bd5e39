"""The daemon's waker thread: no vLLM server stays asleep because a cycle ended badly.

A record in ``daemon_state`` (:mod:`lorad.release.gpu_share`) says a server was put to sleep and not
seen awake again: the daemon (or a ``lorad train``) died while its worker trained, or the
wake after the worker failed. At start (after :func:`lorad.cycle.recover` stopped any
orphaned worker) and every ``RETRY_EVERY`` seconds while such a record exists, this thread
takes the training lock, so it never wakes a server beside a running worker, and wakes the
recorded servers. It has its own buffer connection and never holds up the main loop. A round
that raises is logged (``waker_round_failed``) and the next one comes as usual: the thread is
the retry, so it never dies of one.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import structlog

from lorad import events
from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Buffer
from lorad.cycle import TrainingBusy, training_lock
from lorad.release import gpu_share

if TYPE_CHECKING:
    from lorad.config import Settings

log = structlog.get_logger()

RETRY_EVERY = 30.0  # seconds between wakes of a server that is still asleep
STOP_WAIT = 5.0  # seconds shutdown waits for a wake in progress


class Waker(threading.Thread):
    """Wakes the servers recorded asleep while no cycle runs.

    Args:
        settings: for the buffer and state directory.
        retry_every: seconds between attempts while a record is left.
    """

    def __init__(self, settings: Settings, retry_every: float = RETRY_EVERY):
        super().__init__(name="lorad-waker", daemon=True)
        self.settings = settings
        self.retry_every = retry_every
        self._stop_event = threading.Event()
        self._poke = threading.Event()

    def poke(self) -> None:
        """Look now (a job just ended)."""
        self._poke.set()

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """Stop after the wake in progress; a hung server holds up shutdown at most ``timeout`` s
        (the record stays, and the next start wakes it)."""
        self._stop_event.set()
        self._poke.set()
        self.join(timeout)

    def run(self) -> None:
        s = self.settings
        with Buffer(s.buffer_path, s.buffer.synchronous) as buffer:
            store = JobStore(buffer.conn)
            while not self._stop_event.is_set():
                try:
                    self._round(store, buffer)
                except Exception as e:  # noqa: BLE001 - the thread is the retry: it must outlive any round
                    log.exception(events.WAKER_ROUND_FAILED, error=f"{type(e).__name__}: {e}")
                self._poke.wait(self.retry_every)
                self._poke.clear()

    def _round(self, store: JobStore, buffer: Buffer) -> None:
        if gpu_share.records(store):
            try:
                with training_lock(self.settings.state_dir, "the daemon, waking servers left asleep"):
                    gpu_share.GpuShare([], store, buffer.record_event).wake_recorded()
            except TrainingBusy:
                pass  # the cycle holding it wakes them when its worker ends
