"""The daemon's job thread: one training cycle (:func:`lorad.cycle.run`) beside the main loop.

The job's record lives in the buffer (:mod:`lorad.buffer.job_table`); the pipeline moves it. This
thread only keeps what the main loop reads without waiting (:meth:`JobRunner.info`, memory
only) and passes on its requests to pause or cancel, which stop the worker at its next step
(it checkpoints first). The thread has its own buffer connection, so its writes never hold up
the daemon.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lorad import cycle
from lorad.training import supervisor
from lorad.training.jobdir import STAGE_EVALUATING

if TYPE_CHECKING:
    from lorad.config import Settings


class JobRunner(threading.Thread):
    """Runs one job in a thread.

    Args:
        settings: the configuration the job runs with (fixed for the job's run).
        job: the job's row (queued, or paused to resume).
        window_end: Unix time at which the worker should checkpoint and pause (None = no limit).
        on_concluded: called with the job thread's buffer once a version was promoted or
            rejected, before the job's final state is recorded: whoever sees that state sees
            its effects in status.
    """

    def __init__(
        self,
        settings: Settings,
        job: dict,
        window_end: float | None = None,
        on_concluded: Callable[[Any], None] | None = None,
    ):
        super().__init__(name=f"lorad-job-{job['job_id']}", daemon=True)
        self.settings = settings
        self.job = job
        self.job_id = job["job_id"]
        self.window_end = window_end
        self.on_concluded = on_concluded
        self.state = "preparing" if not job.get("job_dir") else "training"
        self.concluding = False  # the pipeline concludes (its publish hooks may wait on a server)
        self.progress: dict | None = job.get("progress")
        self.outcome: cycle.Outcome | None = None
        self.started = time.time()
        self._stop_request = cycle.StopRequest()  # (not _stop: Thread.join calls its own _stop)
        self._lock = threading.Lock()

    # -- from the main loop ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop_request.requested

    @property
    def final_state(self) -> str | None:
        return self.outcome.status if self.outcome else None

    @property
    def reason(self) -> str | None:
        return self.outcome.reason if self.outcome else None

    @property
    def version(self) -> str | None:
        return self.outcome.version if self.outcome else None

    def info(self) -> dict:
        with self._lock:
            return {
                "job_id": self.job_id,
                "state": self.state,
                "trigger": self.job["trigger"],
                "progress": dict(self.progress) if self.progress else None,
                "started_at": self.started,
                "stopping": self._stop_request.mode if self._stop_request.requested else None,
                "window_end": self.window_end,
            }

    def pause(self, reason: str) -> None:
        self._stop_request.pause(reason)

    def cancel(self, reason: str) -> None:
        self._stop_request.cancel(reason)

    def kill(self) -> None:
        """Last resort at shutdown: the worker did not stop in time."""
        supervisor.kill(cycle.job_dir_of(self.settings, self.job_id))

    # -- the job thread -------------------------------------------------------------------------

    def _on_state(self, state: str) -> None:
        with self._lock:
            self.state = state
            # "evaluating" from the pipeline, not from a progress record: the worker is done
            self.concluding = state == "evaluating"

    def _on_progress(self, record: dict) -> None:
        with self._lock:
            self.progress = record
            if record.get("stage") == STAGE_EVALUATING and self.state == "training":
                self.state = "evaluating"

    def run(self) -> None:
        self.outcome = cycle.run(
            self.settings,
            self.job_id,
            holder=f"the daemon, job {self.job_id}",
            window_end=self.window_end,
            stop=self._stop_request,
            on_progress=self._on_progress,
            on_state=self._on_state,
            on_concluded=self.on_concluded,
        )
