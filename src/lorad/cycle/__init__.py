"""One training cycle, whichever front end starts it: the daemon's job thread or ``lorad train``.

A cycle is a job (a row in the buffer's ``jobs`` table, see :mod:`lorad.buffer.job_table`) driven
through the same steps by :func:`run`:

1. the training lock (one cycle per state directory, see :func:`training_lock`);
2. the live check (:func:`lorad.release.check_live`): roll the active adapter back if its
   live first-attempt acceptance fell significantly below the previous one's;
3. :func:`prepare`: refresh the examples, draw a snapshot (new since the active version plus
   replay) and the held-out set, write the job directory (job.json, the rows, plan.json);
   a paused job skips this and resumes on its directory;
4. the worker subprocess (:func:`lorad.training.supervisor.supervise`), which trains,
   checkpoints, saves the adapter and scores it (result.json), while any vLLM server that
   shares the GPU sleeps (:class:`lorad.release.gpu_share.GpuShare`; woken however the worker ends);
5. :func:`conclude` (:mod:`lorad.cycle.conclusion`, named steps): automatic rollback when the
   active adapter now scores worse than the previous one, the gate's verdict, a new registry
   version (rejected ones too), promotion and publishing or the ``candidate_rejected`` event, pruning;
6. the job's final state, and its checkpoints removed once they can serve no resume.

Front ends add rendering and threads, never steps. Torch is never imported here.
"""

from lorad.cycle.conclusion import conclude
from lorad.cycle.driver import KILLED_REASON, STALE_REASON, recover, run, run_now
from lorad.cycle.lock import TrainingBusy, training_lock
from lorad.cycle.outcome import CycleError, Outcome, StopRequest
from lorad.cycle.plan import NothingToTrain, Plan, job_dir_of, prepare, set_window_end

__all__ = [
    "CycleError",
    "KILLED_REASON",
    "NothingToTrain",
    "Outcome",
    "Plan",
    "STALE_REASON",
    "StopRequest",
    "TrainingBusy",
    "conclude",
    "job_dir_of",
    "prepare",
    "recover",
    "run",
    "run_now",
    "set_window_end",
    "training_lock",
]
