"""One training cycle, whichever front end starts it: the daemon's job thread or ``lorad train``.

A cycle is a job (a row in the buffer's ``jobs`` table, see :mod:`lorad.buffer.jobs`) driven
through the same steps by :func:`run`:

1. the training lock (one cycle per state directory, see :func:`training_lock`);
2. the live check (:func:`lorad.release.check_live`): roll the active adapter back if its
   live first-attempt acceptance fell significantly below the previous one's;
3. :func:`prepare`: refresh the examples, draw a snapshot (new since the active version plus
   replay) and the held-out set, write the job directory (job.json, the rows, plan.json);
   a paused job skips this and resumes on its directory;
4. the worker subprocess (:func:`lorad.training.supervisor.supervise`), which trains,
   checkpoints, saves the adapter and scores it (result.json), while any vLLM server that
   shares the GPU sleeps (:class:`lorad.gpu_share.GpuShare`; woken however the worker ends);
5. :func:`conclude`: automatic rollback when the active adapter now scores worse than the
   previous one, the gate's verdict, a new registry version (rejected ones too), promotion
   and publishing or the ``candidate_rejected`` event, pruning;
6. the job's final state, and its checkpoints removed once they can serve no resume.

Front ends add rendering and threads, never steps. Torch is never imported here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import structlog

from lorad import events, gguf_export, gpu_share, release
from lorad.buffer.jobs import ACTIVE, JobStore
from lorad.evaluation.gate import Thresholds, Verdict, decide, decide_rollback
from lorad.registry import Change, Registry
from lorad.training import supervisor
from lorad.training.job import (ADAPTER_DIR, CHECKPOINTS_DIR, EXIT_CANCELLED, EXIT_OK, EXIT_PAUSED, JOB_FILE,
                                JobError, atomic_write, build_spec, read_job, read_result, write_job)

log = structlog.get_logger()

PLAN_FILE = "plan.json"
JOURNAL_FILE = "conclusion.json"
STALE_REASON = "daemon restarted while the job was running"
KILLED_REASON = "worker killed"  # "worker killed (signal 9)": a job paused because its worker died
LOCK_FILE = "training.lock"


class CycleError(Exception):
    "A cycle cannot start or finish; the message says why."


class NothingToTrain(CycleError):
    "The snapshot has no training examples (nothing new, or the policy selects none)."


class TrainingBusy(CycleError):
    "Another training cycle (the daemon's, or a `lorad train`) is running on this state directory."


# -- one cycle at a time --------------------------------------------------------------------------


@contextmanager
def training_lock(state_dir, holder: str):
    """Hold ``<state_dir>/training.lock`` for one cycle, or raise TrainingBusy at once.

    The daemon's jobs and ``lorad train`` both take it, so two cycles never train side by side
    (on one GPU, the second would run out of memory). The lock is an flock on an open file: it
    goes with the process that held it, however that process ends.

    Args:
        holder: who holds it, written into the file for the one that finds it taken.
    """
    path = Path(state_dir) / LOCK_FILE
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


# -- what prepare decided, for conclude -----------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """plan.json: what the candidate is compared with and what it was trained on.

    Written by :func:`prepare`, read by :func:`conclude` (the worker never reads it).
    ``examples``: max_seq, count, sha256 and seqs of the snapshot's examples, and its stats;
    ``heldout``: count and sha256 of the held-out chain ids.
    """

    active: str | None
    previous: str | None  # scored too, for the rollback check (None: not re-scoring)
    since_seq: int
    examples: dict
    heldout: dict

    def write(self, job_dir) -> None:
        atomic_write(Path(job_dir) / PLAN_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, job_dir) -> "Plan":
        path = Path(job_dir) / PLAN_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise CycleError(f"{path}: cannot read the job's plan: {e}") from None


# -- what a cycle did -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one cycle did, for the CLI, the daemon and the audit trail.

    ``status`` is the job's final state (promoted | rejected | failed | paused | cancelled |
    skipped), or ``busy`` when ``lorad train`` found another cycle running and made no job.
    """

    job_id: str
    status: str
    reason: str = ""
    version: str | None = None
    verdict: dict | None = None
    metrics: dict | None = None
    baseline: str = "active"  # which metrics the candidate was compared with
    baseline_version: str | None = None
    rollback: dict | None = None  # automatic rollback by re-scoring, when checked
    live: dict | None = None  # the live check, when it ran
    publish: list = field(default_factory=list)
    pruned: list = field(default_factory=list)
    training: dict = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def as_dict(self) -> dict:
        return asdict(self) | {"promoted": self.promoted}


class StopRequest:
    """Asked from another thread: stop the job at its next step, to pause it or to cancel it.

    ``event`` is set by either (the worker checkpoints and stops); ``cancelled`` only by a
    cancel: it also stops a conclusion's wait on its publish hooks. A pause does not, so a
    daemon stopping mid-conclusion leaves the hooks to run again at its next start.
    """

    def __init__(self):
        self.event = threading.Event()
        self.cancelled = threading.Event()
        self.mode = "pause"
        self.reason = ""

    def pause(self, reason: str) -> None:
        self.reason = reason
        self.event.set()

    def cancel(self, reason: str) -> None:
        self.mode, self.reason = "cancel", reason
        self.event.set()
        self.cancelled.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def state(self) -> str:
        return "cancelled" if self.mode == "cancel" else "paused"


# -- the steps ------------------------------------------------------------------------------------


def job_dir_of(settings, job_id: str) -> Path:
    return Path(settings.state_dir) / "jobs" / job_id


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()


def prepare(settings, buffer, job_id: str, *, window_end: float | None = None, since: int | None = None,
            now: float | None = None) -> Path:
    """Draw the dataset snapshot and write the job directory ``state_dir/jobs/<job_id>``.

    The candidate warm-starts from the active adapter (when ``training.warm_start``) and is
    scored beside it; with ``evaluation.rescore_active`` the previous blessed version is
    scored too, for the automatic rollback check.

    Args:
        since: draw new examples after this seq (default: the active version's max_seq with
            ``training.warm_start``, else 0: everything, from the base).

    Raises:
        NothingToTrain: the snapshot has no training examples.
        CycleError: the active or previous version's files fail their sha256, or a pointer
            is not believed (see ``Registry.pointer_problems``).
    """
    from lorad.buffer import examples

    t, sel = settings.training, settings.selection
    registry = release.open_registry(settings)
    examples.refresh(buffer, sel, now=now)
    rebuild = since is None and not t.warm_start
    if since is None:
        # Warm start continues the active adapter on what is new (plus replay); without it each
        # cycle trains a fresh adapter from the base on the whole buffer, as ReST-EM does.
        since = release.since_seq(registry) if t.warm_start else 0
    if rebuild and examples.count_new(buffer, release.since_seq(registry), sel, now=now) == 0:
        # Nothing arrived since the active version: retraining on the same buffer changes nothing.
        raise NothingToTrain(f"no training examples for policy {sel.policy!r} new since the active version")
    # GRPO trains on prompts (prompts.jsonl) and is scored on the same held-out rows as SFT.
    snap = examples.build_snapshot(
        buffer, sel, method="sft" if "grpo" in t.phases else t.method, n=t.train_examples,
        replay_ratio=t.replay_ratio, since_seq=since, max_heldout=settings.evaluation.max_heldout, now=now)
    trains_rows = t.phases != ("grpo",)  # GRPO alone trains on prompts only
    if trains_rows and not snap.train:
        raise NothingToTrain(f"no training examples for policy {sel.policy!r} (snapshot: {snap.stats})")
    prompts = None
    if "grpo" in t.phases:
        from lorad.buffer.prompts import build_prompts

        prompts = build_prompts(buffer, sel, n=t.train_examples)
        if not prompts.rows:
            raise NothingToTrain(f"no training task with a specification for GRPO (prompts: {prompts.stats})")
        if not trains_rows:
            snap.train, snap.example_seqs = [], []
        # The version covers what either phase trained on.
        snap.example_seqs = sorted(set(snap.example_seqs) | set(prompts.seqs))
        snap.stats = snap.stats | prompts.stats | {"method": t.method}
    cur, prev = registry.current(), registry.previous()
    # Never warm-start from, or compare against, files that are not what was blessed.
    for name in filter(None, (cur, prev)):
        problems = registry.verify(name)
        if problems:
            raise CycleError(f"adapter version {name} fails its sha256 check ({'; '.join(problems)}); "
                             f"roll back or promote a sound version first")
    bent = registry.pointer_problems()
    if bent:  # current reads as None: training would quietly start again from the base model
        raise CycleError(f"the registry's pointers are not believed ({'; '.join(bent)}); "
                         f"`lorad promote VERSION` repairs them")
    rescore = settings.evaluation.rescore_active and cur is not None and prev is not None
    current_path = str(registry.path_of(cur)) if cur else None
    spec = build_spec(job_id, settings.state_dir, t, settings.evaluation, parent_adapter=current_path,
                      reference_adapter=current_path,
                      previous_adapter=str(registry.path_of(prev)) if rescore else None, window_end=window_end)
    job_dir = job_dir_of(settings, job_id)
    write_job(job_dir, spec, snap.train, snap.heldout, prompts.rows if prompts else None)
    Plan(active=cur, previous=prev if rescore else None, since_seq=since,
         examples={"max_seq": snap.max_seq, "count": len(snap.example_seqs),
                   "sha256": _digest(snap.example_seqs), "seqs": snap.example_seqs, "stats": snap.stats},
         heldout={"count": len(snap.heldout), "sha256": _digest(r.get("chain_id") for r in snap.heldout)},
         ).write(job_dir)
    log.info(events.JOB_PREPARED, job_id=job_id, train_rows=len(snap.train), prompts=len(prompts.rows) if prompts else 0,
             heldout=len(snap.heldout),
             active=cur, rescore_previous=rescore)
    return job_dir


def set_window_end(job_dir, window_end: float | None) -> None:
    """Give a paused job a new window end before it resumes."""
    spec = replace(read_job(job_dir), window_end=window_end)
    atomic_write(Path(job_dir) / JOB_FILE, json.dumps(spec.as_dict(), indent=2) + "\n")


class Journal:
    """conclusion.json: the steps of :func:`conclude`, each recorded as it completes, and the
    intent of each pointer move recorded before it moves.

    conclude run again on the same job (after a crash, a kill -9, a restart) reads it and
    finishes what was recorded: one version, at most one promotion or rollback, the publish
    hooks run for each once they were recorded as run (a hook in flight at the crash runs
    again, with the same change). Written and read by this module alone.
    """

    def __init__(self, job_dir):
        self.path = Path(job_dir) / JOURNAL_FILE
        try:
            self.entries: dict = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.entries = {}
        except ValueError as e:
            raise CycleError(f"{self.path}: unreadable conclusion journal: {e}") from None

    def get(self, key: str, default=None):
        return self.entries.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def record(self, key: str, value) -> None:
        self.entries[key] = value
        atomic_write(self.path, json.dumps(self.entries, indent=2, default=str) + "\n")


def _change(d: dict) -> Change:
    return Change(d["action"], d["version"], d["replaced"], d["previous"], tuple(d["before"]), d.get("reason", ""))


def _move_once(journal: Journal, registry: Registry, key: str, intent: dict, move: Callable[[], Change]) -> Change:
    """Make a pointer move that ``intent`` ({"action", "to", "from", "previous", "reason"}) describes,
    once: recorded first as an intent, then as the change made."""
    if f"{key}_change" in journal:
        return _change(journal.get(f"{key}_change"))
    if f"{key}_intent" not in journal:
        journal.record(f"{key}_intent", intent)
    elif registry.current() == intent["to"]:
        # It moved (and was audited) before the crash; only the journal did not hear of it.
        change = Change(intent["action"], intent["to"], intent["from"], registry.previous(),
                        (intent["from"], intent["previous"]), intent["reason"])
        journal.record(f"{key}_change", change.as_dict())
        return change
    change = move()
    journal.record(f"{key}_change", change.as_dict())
    emit = log.info if change.action == "promoted" else log.warning
    emit(_EVENT[change.action], version=change.version, replaced=change.replaced, reason=change.reason)
    return change


_EVENT = {"promoted": events.ADAPTER_PROMOTED, "rolled_back": events.ADAPTER_ROLLED_BACK}


def _publish_once(journal: Journal, settings, buffer, key: str, change: Change,
                  cancel: threading.Event | None) -> dict:
    report = journal.get(f"{key}_published")
    if report is None:
        # Recorded even when cancelled: whoever cancelled asked not to wait for the server,
        # and a restart must not start the wait again.
        report = release.publish(settings, buffer, change, cancel)
        journal.record(f"{key}_published", report)
    return report


def _version_of(registry: Registry, journal: Journal, job_id: str):
    """The version this job already made, if a crash came after it was made."""
    name = journal.get("version")
    for v in registry.versions():
        if v.name == name or (name is None and v.record.get("job_id") == job_id):
            return v
    return None


def conclude(settings, buffer, job_dir, *, now: datetime | None = None,
             cancel: threading.Event | None = None) -> Outcome:
    """Decide on a finished job: rollback check, gate, new version, promote or reject, publish, prune.

    Idempotent: run again on the same job (after a crash at any point) it finishes the
    conclusion its journal recorded (see :class:`Journal`) and returns the same outcome.

    Args:
        cancel: set by ``lorad cancel``: publish hooks still waiting on a server stop (each a
            failed hook, a required one reverting the change as any failure does); the
            outcome's reason says so. The rest of the conclusion is quick and runs on.
    """
    job_dir = Path(job_dir)
    spec, plan = read_job(job_dir), Plan.read(job_dir)
    try:
        result = read_result(job_dir)
    except JobError as e:
        return Outcome(spec.job_id, "failed", str(e))
    if result is None:
        return Outcome(spec.job_id, "failed", "the worker wrote no result")
    stats = plan.examples.get("stats") or {}
    outcome = Outcome(spec.job_id, "failed" if result.status == "succeeded" else result.status, result.reason)
    outcome.training = {"steps": result.steps, "final_loss": result.final_loss,
                        "train_seconds": result.train_seconds, "tokens": result.tokens,
                        "train_rows": stats.get("rows"), "new": stats.get("new"), "replayed": stats.get("replayed")}
    if result.phases:
        outcome.training["phases"] = [{k: p[k] for k in ("method", "steps", "final_loss", "train_seconds", "kept",
                                                         "decision") if k in p} for p in result.phases]
    if not result.succeeded:
        return outcome
    registry = release.open_registry(settings, buffer)
    journal = Journal(job_dir)
    metrics = outcome.metrics = result.metrics
    e = settings.evaluation

    # 1. Is the adapter serving now worse than the previous blessed one on today's held-out set?
    if "checked" not in journal:
        check_out, baseline, baseline_version = None, "active", plan.active
        cur = registry.current()
        intent = journal.get("rollback_intent")
        if intent is None and metrics and "previous" in metrics and cur and cur == plan.active:
            check = decide_rollback(metrics["active"], metrics["previous"], e.rollback_threshold, e.confidence)
            check_out = {"kind": "rescore", "active": cur, "previous": plan.previous, "rolled_back": False,
                         "reasons": check.reasons}
            if check.roll_back and registry.previous() == plan.previous:
                intent = {"action": "rolled_back", "to": plan.previous, "from": cur, "previous": plan.previous,
                          "reason": "re-scored: " + check.reasons[0], "check": check_out}
        if intent is not None:
            change = _move_once(journal, registry, "rollback", intent, lambda: registry.rollback(
                None, reason=intent["reason"], job_id=spec.job_id,
                metrics={"active": metrics["active"], "previous": metrics["previous"]}))
            report = _publish_once(journal, settings, buffer, "rollback", change, cancel)
            check_out = intent["check"] | {"rolled_back": True, "to": change.version, "publish": report}
            baseline, baseline_version = "previous", change.version
        journal.record("checked", {"rollback": check_out, "baseline": baseline, "baseline_version": baseline_version})
    checked = journal.get("checked")
    outcome.rollback = checked["rollback"]
    outcome.baseline, outcome.baseline_version = baseline, baseline_version = checked["baseline"], checked["baseline_version"]

    # 2. The gate, and 3. every finished candidate becomes a version, with its verdict.
    version = _version_of(registry, journal, spec.job_id)
    if version is None:
        cur = registry.current()
        if not metrics or "candidate" not in metrics:
            verdict = Verdict(False, ["no held-out metrics (empty held-out set or evaluation off); "
                                      f"at least {e.min_heldout_examples} held-out examples are needed to promote"])
        else:
            candidate = dict(metrics["candidate"])
            if result.health is not None:
                candidate["health"] = result.health
            verdict = decide(metrics[baseline], candidate,
                             Thresholds(e.min_improvement, e.confidence, e.min_heldout_examples))
            if cur != baseline_version:
                verdict = Verdict(False, [f"the active adapter changed during the job ({baseline_version or 'base model'}"
                                          f" -> {cur or 'base model'}); the comparison is stale"] + verdict.reasons)
        record = {
            "job_id": spec.job_id, "base_model": spec.base_model, "base_model_path": result.base_model,
            "method": spec.method,
            "hyperparameters": {k: getattr(spec, k) for k in (
                "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "max_steps",
                "epochs", "batch_size", "grad_accum", "max_seq_length", "seed", "packing",
                *(("grpo_steps", "grpo_learning_rate") if spec.method == "sft+grpo" else ()))},
            "parent": Path(spec.parent_adapter).name if spec.parent_adapter else None,
            "training": outcome.training,
            "examples": {k: plan.examples.get(k) for k in ("max_seq", "count", "sha256", "seqs")} | {"stats": stats},
            "heldout": plan.heldout,
            "compared_with": {"label": baseline, "version": baseline_version},
            "metrics": metrics, "health": result.health, "verdict": verdict.as_dict(),
        }
        exported = gguf_export.version_export(settings.publish, job_dir / ADAPTER_DIR, result.base_model,
                                              settings.training.base_model, name=f"lorad {spec.job_id}")
        if exported is not None:
            record["gguf"] = exported
            if "refused" in exported:
                log.warning(events.GGUF_EXPORT_REFUSED, job_id=spec.job_id, reason=exported["refused"])
            else:
                log.info(events.GGUF_EXPORTED, job_id=spec.job_id, sha256=exported["sha256"], base=exported["base"])
        version = registry.create(job_dir / ADAPTER_DIR, record, now=now)
    if "version" not in journal:
        journal.record("version", version.name)
    verdict = Verdict.from_dict(version.verdict)
    outcome.verdict, outcome.version = verdict.as_dict(), version.name
    reasons = "; ".join(verdict.reasons)

    # 4. Promote, or record the rejection.
    if verdict.promote:
        intent = {"action": "promoted", "to": version.name, "from": registry.current(),
                  "previous": registry.previous(), "reason": reasons}
        change = _move_once(journal, registry, "promotion", intent, lambda: registry.promote(
            version.name, reason=reasons, job_id=spec.job_id, reasons=verdict.reasons, metrics=metrics))
        report = _publish_once(journal, settings, buffer, "promotion", change, cancel)
        outcome.publish = report["results"]
        if report["reverted"]:
            outcome.status, outcome.reason = "rejected", report["reverted"]["reason"]
        else:
            outcome.status, outcome.reason = "promoted", reasons
        if report.get("cancelled"):
            outcome.reason += "; its publish hooks were cancelled by request"
    else:
        if "rejection_recorded" not in journal:
            buffer.record_event(events.CANDIDATE_REJECTED, version=version.name, job_id=spec.job_id,
                                reasons=verdict.reasons, metrics=metrics)
            log.info(events.CANDIDATE_REJECTED, version=version.name, job_id=spec.job_id, reasons=verdict.reasons)
            journal.record("rejection_recorded", True)
        outcome.status, outcome.reason = "rejected", reasons

    # 5. Retention.
    outcome.pruned = registry.prune()
    if outcome.pruned:
        log.info(events.VERSIONS_PRUNED, versions=outcome.pruned)
    return outcome


# -- the whole cycle ------------------------------------------------------------------------------


_FINAL_EVENTS = {"promoted": events.JOB_PROMOTED, "rejected": events.JOB_REJECTED, "failed": events.JOB_FAILED,
                 "cancelled": events.JOB_CANCELLED, "paused": events.JOB_PAUSED, "skipped": events.JOB_SKIPPED}


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
            self.store.transition(self.job_id, state, outcome.reason, progress=self.progress,
                                  version=outcome.version, **fields)
        except Exception:
            log.exception(events.JOB_STATE_NOT_SAVED, job_id=self.job_id, state=state)
        log.info(_FINAL_EVENTS[state], job_id=self.job_id, reason=outcome.reason, version=outcome.version)
        if self.on_state is not None:
            self.on_state(state)
        return outcome


def run(settings, job_id: str, *, holder: str, window_end: float | None = None,
        stop: StopRequest | None = None, on_progress: Callable[[dict], None] | None = None,
        on_state: Callable[[str], None] | None = None,
        on_concluded: Callable[[object], None] | None = None) -> Outcome:
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
                share = gpu_share.GpuShare(gpu_share.servers_from_settings(settings.publish), job.store,
                                           buffer.record_event)
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
                    # it ends, before the conclusion publishes to it (lorad.gpu_share).
                    with share.asleep(job_id):
                        code = supervisor.supervise(job_dir, stop.event if stop else None,
                                                    (lambda: stop.mode == "cancel") if stop else None,
                                                    on_progress=progress)
                    if code != EXIT_OK:
                        kills = _kills_in_a_row(job.store.events(job_id))
                        return job.finish(_stopped_or_failed(job_id, job_dir, code, stop, live, kills=kills,
                                                             max_kills=settings.schedule.max_worker_kills))
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


def _stopped_or_failed(job_id: str, job_dir: Path, code: int, stop: StopRequest | None, live, *,
                       kills: int, max_kills: int) -> Outcome:
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
    asked = stop is not None and stop.requested
    if code == EXIT_PAUSED or (code < 0 and asked):
        # (a worker signalled before its handlers were installed dies of the signal: asked to
        # stop, it stopped; a paused job without a checkpoint restarts from step 0)
        return Outcome(job_id, stop.state if asked else "paused", (stop.reason if asked else "") or said or "paused",
                       live=live)
    if code == EXIT_CANCELLED:
        return Outcome(job_id, "cancelled", (stop.reason if asked else "") or said or "cancelled", live=live)
    if code < 0:
        # Killed by a signal lorad did not send (the OOM killer, kill -9): the checkpoints it
        # left are whole (only complete ones are trusted), so the job resumes from them, unless
        # its worker dies every time.
        why = f"{KILLED_REASON} (signal {-code})"
        n = kills + 1
        if n >= max_kills:
            hint = "; the kernel's OOM killer sends signal 9: is memory short?" if -code == signal.SIGKILL else ""
            return Outcome(job_id, "failed", f"{why} in {n} run{'s' * (n > 1)} in a row "
                           f"(schedule.max_worker_kills = {max_kills}){hint}", live=live)
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


def run_now(settings, *, ingest_first: bool = True, on_progress: Callable[[dict], None] | None = None) -> Outcome:
    """``lorad train``: ingest, then one whole cycle in this process, recorded as a ``cli`` job.

    Returns an Outcome of status ``busy`` (and records no job) when another cycle holds the lock.
    """
    from lorad.buffer.store import Buffer

    with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
        if ingest_first and settings.store.sources:
            from lorad.ingest import ingest
            from lorad.sources import open_sources

            ingest(buffer, open_sources(settings.store), settings.buffer.batch_size)
        try:
            with training_lock(settings.state_dir, "probe"):
                pass
        except TrainingBusy as e:
            return Outcome("", "busy", str(e))
        job_id = JobStore(buffer.conn).create("cli")["job_id"]
    return run(settings, job_id, holder=f"lorad train, job {job_id}", on_progress=on_progress)


def recover(settings, store: JobStore) -> list[dict]:
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
