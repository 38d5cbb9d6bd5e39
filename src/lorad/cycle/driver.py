"""The whole cycle: the job row through its states, the lock, prepare, the worker, conclude."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lorad import events, release
from lorad.buffer.job_table import ACTIVE, JobStore
from lorad.cycle.conclusion import conclude
from lorad.cycle.lock import TrainingBusy, training_lock
from lorad.cycle.outcome import CycleError, Outcome, StopRequest
from lorad.cycle.plan import NothingToTrain, prepare, set_window_end
from lorad.release import gpu_share
from lorad.training import supervisor
from lorad.training.jobdir import (
    ADAPTER_DIR,
    CHECKPOINTS_DIR,
    EXIT_CANCELLED,
    EXIT_OK,
    EXIT_PAUSED,
    JobError,
    read_result,
)

if TYPE_CHECKING:
    from lorad.config import Settings

log = structlog.get_logger()

STALE_REASON = "daemon restarted while the job was running"
KILLED_REASON = "worker killed"  # "worker killed (signal 9)": a job paused because its worker died


_FINAL_EVENTS = {
    "promoted": events.JOB_PROMOTED,
    "rejected": events.JOB_REJECTED,
    "failed": events.JOB_FAILED,
    "cancelled": events.JOB_CANCELLED,
    "paused": events.JOB_PAUSED,
    "skipped": events.JOB_SKIPPED,
}


class _Job:
    """A job's record as the cycle moves it: the row first, then whoever watches (on_state)."""

    def __init__(self, store: JobStore, row: dict, on_state: Callable[[str], None] | None):
        self.store, self.row, self.on_state = store, row, on_state
        self.job_id = row["job_id"]
        self.progress: dict | None = row.get("progress")

    @property
    def job_dir(self) -> Path | None:
        return Path(self.row["job_dir"]) if self.row.get("job_dir") else None

    def move(self, state: str, **fields) -> None:
        self.store.transition(self.job_id, state, None, **fields)
        self.row |= fields
        log.info(events.JOB_STATE_CHANGED, job_id=self.job_id, state=state)
        if self.on_state is not None:
            self.on_state(state)

    def finish(self, outcome: Outcome, **fields) -> Outcome:
        state = outcome.status
        job_dir = self.job_dir
        if state in ("promoted", "rejected", "cancelled") and job_dir is not None:
            # Checkpoints only serve a resume; the adapter is in the registry by now. A failed
            # job keeps them for a look at what went wrong, a paused one to resume from.
            shutil.rmtree(job_dir / CHECKPOINTS_DIR, ignore_errors=True)
        try:
            self.store.transition(
                self.job_id, state, outcome.reason, progress=self.progress, version=outcome.version, **fields
            )
        except Exception:
            log.exception(events.JOB_STATE_NOT_SAVED, job_id=self.job_id, state=state)
        log.info(_FINAL_EVENTS[state], job_id=self.job_id, reason=outcome.reason, version=outcome.version)
        if self.on_state is not None:
            self.on_state(state)
        return outcome


def run(
    settings: Settings,
    job_id: str,
    *,
    holder: str,
    window_end: float | None = None,
    stop: StopRequest | None = None,
    on_progress: Callable[[dict], None] | None = None,
    on_state: Callable[[str], None] | None = None,
    on_concluded: Callable[[object], None] | None = None,
) -> Outcome:
    """Drive the job ``job_id`` (queued, or paused to resume) to its final state.

    Args:
        holder: who runs it, for the training lock ("the daemon, job ...").
        window_end: Unix time at which the worker checkpoints and pauses (None = no limit).
        stop: pause or cancel from another thread; without it, Ctrl-C cancels.
        on_progress: every progress record of the worker, as it appears.
        on_state: every state the job enters, after it is recorded.
        on_concluded: called with this cycle's buffer once a version was promoted or rejected,
            before the job's final state is recorded (whoever sees that state sees its effects).
    """
    from lorad.buffer.store import Buffer

    with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
        job = _Job(JobStore(buffer.conn), JobStore(buffer.conn).get(job_id), on_state)

        def progress(record: dict) -> None:
            job.progress = record
            if on_progress is not None:
                on_progress(record)

        live = None
        try:
            with training_lock(settings.state_dir, holder):
                share = gpu_share.GpuShare(
                    gpu_share.servers_from_settings(settings.publish), job.store, buffer.record_event
                )
                share.wake_recorded()  # a cycle that died in training left a server asleep
                job_dir = job.job_dir
                if not (job_dir is not None and job_dir.is_dir() and _trained(job_dir)):
                    if job_dir is None or not job_dir.is_dir():
                        job.move("preparing", started_at=time.time())
                        live = release.check_live(settings, buffer)
                        job_dir = prepare(settings, buffer, job_id, window_end=window_end)
                    else:
                        set_window_end(job_dir, window_end)
                    if stop is not None and stop.requested:
                        job.row["job_dir"] = str(job_dir)
                        return job.finish(Outcome(job_id, stop.state, stop.reason, live=live), job_dir=str(job_dir))
                    job.move("training", job_dir=str(job_dir), runs=job.row.get("runs", 0) + 1)
                    # A vLLM server on this GPU sleeps while the worker runs and wakes however
                    # it ends, before the conclusion publishes to it (lorad.release.gpu_share).
                    with share.asleep(job_id):
                        code = supervisor.supervise(
                            job_dir,
                            stop.event if stop else None,
                            (lambda: stop.mode == "cancel") if stop else None,
                            on_progress=progress,
                        )
                    if code != EXIT_OK:
                        kills = _kills_in_a_row(job.store.events(job_id))
                        return job.finish(
                            _stopped_or_failed(
                                job_id,
                                job_dir,
                                code,
                                stop,
                                live,
                                kills=kills,
                                max_kills=settings.schedule.max_worker_kills,
                            )
                        )
                # A worker that succeeded is concluded from its result, never run again (a
                # restart during the conclusion lands here and finishes what conclusion.json says).
                job.move("evaluating", progress=job.progress)
                outcome = conclude(settings, buffer, job_dir, cancel=stop.cancelled if stop else None)
                outcome.live = live
                if on_concluded is not None and outcome.version:
                    try:
                        on_concluded(buffer)
                    except Exception:
                        log.exception(events.STATUS_REFRESH_FAILED, job_id=job_id)
                return job.finish(outcome)
        except NothingToTrain as e:
            return job.finish(Outcome(job_id, "skipped", str(e), live=live))
        except (CycleError, gpu_share.ShareError) as e:  # the lock is taken, a version is tampered with,
            return job.finish(Outcome(job_id, "failed", str(e), live=live))  # a server would not sleep
        except Exception as e:
            log.exception(events.JOB_CRASHED, job_id=job_id)
            return job.finish(Outcome(job_id, "failed", f"{type(e).__name__}: {e}", live=live))


def _trained(job_dir: Path) -> bool:
    """The job's worker already succeeded (result.json says so and the adapter is there)."""
    try:
        result = read_result(job_dir)
    except JobError:
        return False
    return result is not None and result.succeeded and (job_dir / ADAPTER_DIR).is_dir()


def _kills_in_a_row(events: list[dict]) -> int:
    """How many of the job's last runs ended with their worker killed (the pauses since its last
    pause for another reason)."""
    kills = 0
    for e in reversed(events):
        if e["state"] != "paused":
            continue
        if not (e["reason"] or "").startswith(KILLED_REASON):
            break
        kills += 1
    return kills


def _stopped_or_failed(
    job_id: str, job_dir: Path, code: int, stop: StopRequest | None, live, *, kills: int, max_kills: int
) -> Outcome:
    """The state a job ends in when its worker did not succeed.

    Args:
        code: the worker's exit code (negative: the signal it died of).
        kills: runs before this one that ended with the worker killed, in a row.
        max_kills: the kill that makes this many in a row fails the job (schedule.max_worker_kills).
    """
    try:
        result = read_result(job_dir)
    except JobError as e:
        result, unreadable = None, str(e)
    else:
        unreadable = ""
    said = result.reason if result is not None else ""
    asked = stop if stop is not None and stop.requested else None  # the stop lorad asked for
    if code == EXIT_PAUSED or (code < 0 and asked):
        # (a worker signalled before its handlers were installed dies of the signal: asked to
        # stop, it stopped; a paused job without a checkpoint restarts from step 0)
        return Outcome(
            job_id, asked.state if asked else "paused", (asked.reason if asked else "") or said or "paused", live=live
        )
    if code == EXIT_CANCELLED:
        return Outcome(job_id, "cancelled", (asked.reason if asked else "") or said or "cancelled", live=live)
    if code < 0:
        # Killed by a signal lorad did not send (the OOM killer, kill -9): the checkpoints it
        # left are whole (only complete ones are trusted), so the job resumes from them, unless
        # its worker dies every time.
        # A worker that saw why it ends says so first (the Ray driver, when Ray lost a worker).
        why = f"{KILLED_REASON} (signal {-code})" + (f": {said}" if said else "")
        n = kills + 1
        if n >= max_kills:
            hint = "; the kernel's OOM killer sends signal 9: is memory short?" if -code == signal.SIGKILL else ""
            return Outcome(
                job_id,
                "failed",
                f"{why} in {n} run{'s' * (n > 1)} in a row (schedule.max_worker_kills = {max_kills}){hint}",
                live=live,
            )
        return Outcome(job_id, "paused", why, live=live)
    return Outcome(job_id, "failed", said or unreadable or _no_result(job_dir, code), live=live)


def _no_result(job_dir: Path, code: int) -> str:
    """Why a worker that wrote no result.json failed, as far as the parent can tell."""
    reason = f"worker exited with code {code}"
    try:
        free = shutil.disk_usage(job_dir).free
    except OSError:
        return reason
    if free < 1 << 20:  # the worker could not even write why (the disk-full fault test)
        reason += f" without writing its result: the disk holding {job_dir} is full ({free} bytes free)"
    return reason


def run_now(
    settings: Settings, *, ingest_first: bool = True, on_progress: Callable[[dict], None] | None = None
) -> Outcome:
    """``lorad train``: ingest, then one whole cycle in this process, recorded as a ``cli`` job.

    Returns an Outcome of status ``busy`` (and records no job) when another cycle holds the lock.
    """
    from lorad.buffer.store import Buffer

    with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
        if ingest_first and settings.store.sources:
            from lorad.sources import open_sources
            from lorad.sources.ingest import ingest

            ingest(buffer, open_sources(settings.store), settings.buffer.batch_size)
        try:
            with training_lock(settings.state_dir, "probe"):
                pass
        except TrainingBusy as e:
            return Outcome("", "busy", str(e))
        job_id = JobStore(buffer.conn).create("cli")["job_id"]
    return run(settings, job_id, holder=f"lorad train, job {job_id}", on_progress=on_progress)


def recover(settings: Settings, store: JobStore) -> list[dict]:
    """At daemon start: jobs left active by a process that died.

    A worker that outlived its parent (killed with SIGKILL) is stopped first, so a job never
    has two workers writing one job directory. A job whose worker had succeeded stays
    ``evaluating`` and is returned: the daemon concludes it at once (from its result and its
    conclusion journal), window or not. The others become paused (resumable in a window).
    Nothing is touched while another cycle (a running ``lorad train``) holds the training lock:
    the active job is its own.

    Returns:
        The jobs to conclude now, oldest first.
    """
    conclude_now = []
    try:
        with training_lock(settings.state_dir, "the daemon, recovering jobs"):
            for job in reversed(store.list(limit=1000, states=ACTIVE)):
                job_dir = Path(job["job_dir"]) if job["job_dir"] else None
                if job_dir is not None:
                    supervisor.stop_orphan(job_dir)
                if job_dir is not None and _trained(job_dir):
                    conclude_now.append(store.get(job["job_id"]))
                    continue
                store.transition(job["job_id"], "paused", STALE_REASON)
                log.warning(events.JOB_PAUSED, job_id=job["job_id"], reason=STALE_REASON)
    except TrainingBusy as e:
        log.warning(events.JOB_RECOVERY_SKIPPED, reason=str(e))
        return []
    return conclude_now
