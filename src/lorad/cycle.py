"""One training cycle: prepare a job, run the worker, conclude (gate → version → promote → publish).

The daemon drives the steps one by one (it tails progress and pauses or cancels the worker);
``lorad train --once`` runs them all in the foreground through :func:`run_once`:

1. :func:`check_live` — roll the active adapter back if its live first-attempt acceptance is
   significantly below the previous one's (only when artifacts name their adapter);
2. :func:`prepare` — refresh the examples, draw a snapshot (new since the active version plus
   replay) and the held-out set, and write the job directory;
3. :func:`run_worker` — the training worker as a subprocess (SIGTERM pauses, SIGINT cancels);
4. :func:`conclude` — automatic rollback when the active adapter now scores worse than the
   previous one, the gate's verdict on the candidate, a new registry version (rejected ones
   too), promotion or the ``candidate_rejected`` event, publish hooks, pruning.

Torch is never imported here: the worker process does all of that.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from lorad import log
from lorad.evaluation.gate import Thresholds, Verdict, decide, decide_rollback
from lorad.registry import Change, Registry, RegistryError

WORKER_LOG = "worker.log"
WORKER_PID = "worker.pid"


class CycleError(Exception):
    "A cycle cannot start or finish; the message says why."


class NothingToTrain(CycleError):
    "The snapshot has no training examples (nothing new, or the policy selects none)."


class TrainingBusy(CycleError):
    "Another training cycle (the daemon's, or a `lorad train --once`) is running on this state directory."


@contextmanager
def training_lock(settings, holder: str):
    """Hold ``<state_dir>/training.lock`` for one cycle, or raise TrainingBusy at once.

    The daemon's jobs and ``lorad train --once`` both take it, so two cycles never train
    side by side (on one GPU, the second would run out of memory). The lock is an flock on
    an open file: it goes with the process that held it, however that process ends.

    Args:
        holder: who holds it, written into the file for the one that finds it taken.
    """
    path = Path(settings.daemon.state_dir) / "training.lock"
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


@dataclass
class CycleOutcome:
    """What one cycle did, for the CLI, the daemon and the audit trail."""

    job_id: str
    status: str  # promoted | rejected | failed | paused | cancelled | skipped | busy
    reason: str = ""
    version: str | None = None
    verdict: dict | None = None
    metrics: dict | None = None
    baseline: str = "active"  # which metrics the candidate was compared with
    baseline_version: str | None = None
    rollback: dict | None = None  # automatic rollback (re-scoring or live), when one happened
    live: dict | None = None
    publish: list = field(default_factory=list)
    pruned: list = field(default_factory=list)
    training: dict = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def as_dict(self) -> dict:
        return {"job_id": self.job_id, "status": self.status, "promoted": self.promoted,
                "reason": self.reason, "version": self.version, "verdict": self.verdict,
                "metrics": self.metrics, "baseline": self.baseline,
                "baseline_version": self.baseline_version, "rollback": self.rollback,
                "live": self.live, "publish": self.publish, "pruned": self.pruned,
                "training": self.training}

    def render(self) -> str:
        """The verdict with its reasons and the metrics side by side."""
        head = f"job {self.job_id}: {self.status.upper()}"
        if self.version:
            head += f" {self.version}"
        lines = [head]
        if self.training:
            t = self.training
            lines.append(f"trained {t.get('steps')} steps on {t.get('train_rows')} rows "
                         f"({t.get('new')} new, {t.get('replayed')} replayed) in "
                         f"{_secs(t.get('train_seconds'))}; final loss {_num(t.get('final_loss'))}")
        for r in (self.live, self.rollback):
            if r and r.get("reasons"):
                lines.append(("rolled back: " if r.get("rolled_back") else "checked: ") + "; ".join(r["reasons"]))
        if self.metrics and "candidate" in self.metrics:
            lines.append(render_metrics(self.metrics, self.baseline, self.baseline_version))
        if self.verdict:
            lines.append("verdict: " + ("promote" if self.verdict.get("promote") else "reject"))
            lines += [f"  - {r}" for r in self.verdict.get("reasons", [])]
        elif self.reason:
            lines.append(f"reason: {self.reason}")
        for p in self.publish:
            lines.append(f"publish {p['hook']}: {'ok' if p['ok'] else 'FAILED'} {p.get('detail', '')}".rstrip())
        if self.pruned:
            lines.append("pruned: " + ", ".join(self.pruned))
        return "\n".join(lines)


def render_metrics(metrics: dict, baseline: str = "active", baseline_version: str | None = None) -> str:
    """A small table: baseline and candidate (and previous, when scored) side by side."""
    label = f"{baseline} ({baseline_version or 'base model'})"
    cols = [(label, metrics.get(baseline) or {}), ("candidate", metrics.get("candidate") or {})]
    if baseline != "previous" and metrics.get("previous"):
        cols.insert(0, ("previous", metrics["previous"]))
    width = max(14, *(len(c[0]) + 2 for c in cols))
    rows = [("", [c[0] for c in cols])]
    rows.append(("held-out NLL", [_num(c[1].get("nll")) for c in cols]))
    rows.append(("perplexity", [_num(c[1].get("perplexity"), 2) for c in cols]))
    rows.append(("tokens/examples", [f"{c[1].get('tokens', '-')}/{c[1].get('examples', '-')}" for c in cols]))
    if any("epsilon" in c[1] for c in cols):
        rows.append(("first-attempt ε", [
            f"{c[1]['epsilon']:.1%} ({c[1]['accepted']}/{c[1]['generated']})" if "epsilon" in c[1] else "-"
            for c in cols]))
    out = []
    for name, values in rows:
        out.append(f"  {name:<16}" + "".join(f"{v:>{width}}" for v in values))
    base, cand = cols[-2][1], cols[-1][1]
    if isinstance(base.get("nll"), float) and isinstance(cand.get("nll"), float) and base["nll"]:
        delta = f"  Δ NLL {(cand['nll'] - base['nll']) / base['nll']:+.2%}"
        if "epsilon" in base and "epsilon" in cand:
            delta += f", Δε {(cand['epsilon'] - base['epsilon']) * 100:+.1f} points"
        out.append(delta)
    return "\n".join(out)


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def _secs(x) -> str:
    return f"{x:.1f}s" if isinstance(x, (int, float)) else "-"


# -- helpers shared with the daemon and the CLI ----------------------------------------------------


def open_registry(settings, buffer=None) -> Registry:
    """The registry of ``settings``; its changes go to ``buffer``'s audit table when given."""
    return Registry(settings.state_dir / "adapters", settings.registry.keep, settings.registry.keep_best,
                    audit=buffer.record_event if buffer is not None else None)


def _audited(registry: Registry, buffer) -> Registry:
    if registry.audit is not None or buffer is None:
        return registry
    return Registry(registry.root, registry.keep, registry.keep_best, audit=buffer.record_event)


def thresholds(settings) -> Thresholds:
    e = settings.evaluation
    return Thresholds(e.min_improvement, e.max_regression, e.min_heldout_examples)


def hooks(settings):
    from lorad.publish import hooks_from_settings

    return hooks_from_settings(settings.publish)


def since_seq(registry: Registry) -> int:
    """The examples seq the active version's snapshot reached (0 with no active version)."""
    name = registry.current()
    if name is None:
        return 0
    try:
        return int((registry.get(name).record.get("examples") or {}).get("max_seq") or 0)
    except (RegistryError, TypeError, ValueError):
        return 0


def trained_seq(registry: Registry) -> int:
    """The examples seq the newest snapshot of any version reached, promoted or rejected."""
    seqs = [0]
    for name in registry.names():
        try:
            seqs.append(int((registry.get(name).record.get("examples") or {}).get("max_seq") or 0))
        except (RegistryError, TypeError, ValueError):
            continue
    return max(seqs)


def _change_and_publish(settings, buffer, registry: Registry, change: Change) -> dict:
    from lorad.publish import publish

    report = publish(registry, change, hooks(settings),
                     audit=buffer.record_event if buffer is not None else None)
    return {"change": change.as_dict(), "publish": report.as_dict()}


def promote(settings, buffer, registry: Registry, version: str, reason: str = "promoted by hand",
            **detail: Any) -> dict:
    """Promote a version (sha256 checked), record it, run the publish hooks.

    Raises:
        RegistryError: unknown or tampered version, or already current.
    """
    registry = _audited(registry, buffer)
    change = registry.promote(version, reason=reason, **detail)
    log.get().info("adapter_promoted", version=change.version, replaced=change.replaced, reason=reason)
    return _change_and_publish(settings, buffer, registry, change)


def rollback(settings, buffer, registry: Registry, version: str | None = None,
             reason: str = "rolled back by hand", **detail: Any) -> dict:
    """Roll back to ``version`` (default: the previous blessed one), record it, run the hooks.

    Raises:
        RegistryError: nothing to roll back to, unknown or tampered version.
    """
    registry = _audited(registry, buffer)
    change = registry.rollback(version, reason=reason, **detail)
    log.get().warning("adapter_rolled_back", version=change.version, replaced=change.replaced, reason=reason)
    return _change_and_publish(settings, buffer, registry, change)


# -- live rollback --------------------------------------------------------------------------------


def check_live(settings, buffer, registry: Registry) -> dict | None:
    """Roll back when live first-attempt acceptance of the active version fell significantly.

    Returns:
        None when there is no active and previous version to compare; else the counts, the
        reasons and whether it rolled back.
    """
    from lorad.live import decide_live, live_counts

    e = settings.evaluation
    cur, prev = registry.current(), registry.previous()
    if not (e.live_metadata_key and cur and prev):
        return None
    counts = live_counts(buffer.conn, e.live_metadata_key, [cur, prev])
    verdict = decide_live(counts[cur], counts[prev], e.live_confidence, e.live_min_attempts)
    out = {"kind": "live", "active": cur, "previous": prev, "rolled_back": False,
           "counts": {v: {"accepted": r.accepted, "attempts": r.attempts} for v, r in counts.items()},
           "reasons": verdict.reasons}
    if verdict.promote:
        done = rollback(settings, buffer, registry, None, reason="live: " + verdict.reasons[0],
                        live=out["counts"])
        out |= {"rolled_back": True, "to": done["change"]["version"], "publish": done["publish"]}
    return out


# -- the steps ----------------------------------------------------------------------------------


def new_job_id(now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"job-{now.strftime('%Y%m%dT%H%M%SZ')}-{os.urandom(2).hex()}"


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()


def prepare(settings, buffer, registry: Registry, job_id: str, *, window_end: float | None = None,
            since: int | None = None, now: float | None = None) -> Path:
    """Draw the dataset snapshot and write the job directory ``state_dir/jobs/<job_id>``.

    The candidate warm-starts from the active adapter (when ``training.warm_start``) and is
    scored beside it; with ``evaluation.rescore_active`` the previous blessed version is
    scored too, for the automatic rollback check.

    Args:
        since: draw new examples after this seq (default: the active version's max_seq;
            0 retrains on everything).

    Raises:
        NothingToTrain: the snapshot has no training examples.
        CycleError: the active or previous version's files
            fail their sha256.
    """
    from lorad.buffer import examples
    from lorad.training.job import spec_from_settings, write_job

    t, sel = settings.training, settings.selection
    examples.refresh(buffer, sel, now=now)
    since = since_seq(registry) if since is None else since
    snap = examples.build_snapshot(
        buffer, sel, method=t.method, n=t.train_examples, replay_ratio=t.replay_ratio,
        since_seq=since, seed=sel.seed, weighting=sel.replay_weighting, now=now)
    if not snap.train:
        raise NothingToTrain(f"no training examples for policy {sel.policy!r} (snapshot: {snap.stats})")
    cur, prev = registry.current(), registry.previous()
    # Never warm-start from, or compare against, files that are not what was blessed.
    for name in filter(None, (cur, prev)):
        problems = registry.verify(name)
        if problems:
            raise CycleError(f"adapter version {name} fails its sha256 check ({'; '.join(problems)}); "
                             f"roll back or promote a sound version first")
    rescore = settings.evaluation.rescore_active and cur is not None and prev is not None
    spec = spec_from_settings(
        settings, job_id, parent_adapter=str(registry.path_of(cur)) if cur else None,
        reference_adapter=str(registry.path_of(cur)) if cur else None,
        previous_adapter=str(registry.path_of(prev)) if rescore else None, window_end=window_end)
    chain_ids = [r.get("chain_id") for r in snap.heldout]
    spec = replace(spec, extra=dict(spec.extra) | {"cycle": {
        "active": cur, "previous": prev if rescore else None, "since_seq": since,
        "examples": {"max_seq": snap.max_seq, "count": len(snap.example_seqs),
                     "sha256": _digest(snap.example_seqs), "seqs": snap.example_seqs,
                     "stats": snap.stats},
        "heldout": {"count": len(snap.heldout), "sha256": _digest(chain_ids)},
    }})
    job_dir = settings.state_dir / "jobs" / job_id
    write_job(job_dir, spec, snap.train, snap.heldout)
    log.get().info("job_prepared", job_id=job_id, train_rows=len(snap.train), heldout=len(snap.heldout),
                   active=cur, rescore_previous=rescore)
    return job_dir


def set_window_end(job_dir, window_end: float | None) -> None:
    """Give a paused job a new window end before it resumes."""
    from lorad.training.job import JOB_FILE, atomic_write, read_job

    spec = replace(read_job(job_dir), window_end=window_end)
    atomic_write(Path(job_dir) / JOB_FILE, json.dumps(spec.as_dict(), indent=2) + "\n")


def run_worker(job_dir, *, on_progress: Callable[[dict], None] | None = None,
               stop_event: threading.Event | None = None, cancel: Callable[[], bool] | None = None,
               poll: float = 0.5) -> int:
    """Run the training worker on ``job_dir`` to its end; returns its exit code.

    Args:
        on_progress: called with every progress record as it appears.
        stop_event: when set, the worker is asked to stop: SIGTERM (checkpoint and pause),
            or SIGINT (cancel) when ``cancel()`` returns true.
        poll: seconds between looks at progress.jsonl.

    Ctrl-C in the foreground cancels the worker the same way (SIGINT) and waits for it.
    """
    from lorad.training.job import iter_progress, read_job, worker_command

    job_dir = Path(job_dir)
    argv = worker_command(job_dir, read_job(job_dir))
    offset = 0
    signalled = False
    with open(job_dir / WORKER_LOG, "ab") as out:
        # Own process group: the daemon signals the worker (and accelerate's ranks) as a whole.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    (job_dir / WORKER_PID).write_text(f"{proc.pid}\n")

    def tail():
        nonlocal offset
        for record, offset in iter_progress(job_dir, offset):
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
                    _signal(proc, signal.SIGINT)
                    signalled = True
                continue
            tail()
            if stop_event is not None and stop_event.is_set() and not signalled:
                _signal(proc, signal.SIGINT if cancel is not None and cancel() else signal.SIGTERM)
                signalled = True
        tail()
    finally:
        (job_dir / WORKER_PID).unlink(missing_ok=True)
    return code


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def kill_worker(job_dir) -> bool:
    """SIGKILL a worker that would not stop (daemon shutdown's last resort)."""
    try:
        pid = int((Path(job_dir) / WORKER_PID).read_text())
        os.killpg(pid, signal.SIGKILL)
        return True
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False


def conclude(settings, buffer, registry: Registry, job_dir, *, now: datetime | None = None) -> CycleOutcome:
    """Decide on a finished job: rollback check, gate, new version, promote or reject, publish, prune."""
    from lorad.training.job import ADAPTER_DIR, read_job, read_result

    logger = log.get()
    registry = _audited(registry, buffer)
    job_dir = Path(job_dir)
    spec = read_job(job_dir)
    result = read_result(job_dir) or {}
    info = (spec.extra or {}).get("cycle", {})
    outcome = CycleOutcome(job_id=spec.job_id, status=result.get("status") or "failed",
                           reason=result.get("reason") or "the worker wrote no result")
    ex = info.get("examples") or {}
    outcome.training = {k: result.get(k) for k in ("steps", "final_loss", "train_seconds", "tokens")} | {
        "train_rows": (ex.get("stats") or {}).get("rows"), "new": (ex.get("stats") or {}).get("new"),
        "replayed": (ex.get("stats") or {}).get("replayed")}
    if result.get("status") != "succeeded":
        return outcome
    adapter_dir = job_dir / ADAPTER_DIR
    metrics = result.get("metrics")
    outcome.metrics = metrics

    # 1. Is the adapter serving now worse than the previous blessed one on today's held-out set?
    baseline, baseline_version = "active", info.get("active")
    cur = registry.current()
    if metrics and "previous" in metrics and cur and cur == info.get("active"):
        check = decide_rollback(metrics["active"], metrics["previous"], settings.evaluation.rollback_threshold)
        outcome.rollback = {"kind": "rescore", "active": cur, "previous": info.get("previous"),
                            "rolled_back": False, "reasons": check.reasons}
        if check.promote and registry.previous() == info.get("previous"):
            done = rollback(settings, buffer, registry, None, reason="re-scored: " + check.reasons[0],
                            job_id=spec.job_id, metrics={"active": metrics["active"], "previous": metrics["previous"]})
            outcome.rollback |= {"rolled_back": True, "to": done["change"]["version"], "publish": done["publish"]}
            baseline, baseline_version = "previous", done["change"]["version"]
            cur = registry.current()

    # 2. The gate.
    if not metrics or "candidate" not in metrics:
        verdict = Verdict(False, ["no held-out metrics (empty held-out set or evaluation off); "
                                  f"at least {settings.evaluation.min_heldout_examples} held-out examples "
                                  "are needed to promote"])
    else:
        candidate = dict(metrics["candidate"])
        if result.get("health") is not None:
            candidate["health"] = result["health"]
        verdict = decide(metrics[baseline], candidate, thresholds(settings))
        if cur != baseline_version:
            verdict = Verdict(False, [f"the active adapter changed during the job ({baseline_version or 'base model'}"
                                      f" -> {cur or 'base model'}); the comparison is stale"] + verdict.reasons)
    outcome.verdict = verdict.as_dict()
    outcome.baseline, outcome.baseline_version = baseline, baseline_version

    # 3. Every finished candidate becomes a version, with its verdict.
    record = {
        "job_id": spec.job_id, "base_model": spec.base_model,
        "base_model_path": result.get("base_model"), "method": spec.method,
        "hyperparameters": {k: getattr(spec, k) for k in (
            "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "max_steps",
            "epochs", "batch_size", "grad_accum", "max_seq_length", "seed", "packing")},
        "parent": Path(spec.parent_adapter).name if spec.parent_adapter else None,
        "training": outcome.training,
        "examples": {k: ex.get(k) for k in ("max_seq", "count", "sha256", "seqs")} | {"stats": ex.get("stats")},
        "heldout": info.get("heldout"),
        "compared_with": {"label": baseline, "version": baseline_version},
        "metrics": metrics, "health": result.get("health"), "verdict": verdict.as_dict(),
    }
    version = registry.create(adapter_dir, record, now=now)
    outcome.version = version.name
    reasons = "; ".join(verdict.reasons)

    # 4. Promote, or record the rejection.
    if verdict.promote:
        done = promote(settings, buffer, registry, version.name, reason=reasons, job_id=spec.job_id,
                       reasons=verdict.reasons, metrics=metrics)
        outcome.publish = done["publish"]["results"]
        if done["publish"]["reverted"]:
            outcome.status, outcome.reason = "rejected", done["publish"]["reverted"]["reason"]
        else:
            outcome.status, outcome.reason = "promoted", reasons
    else:
        buffer.record_event("candidate_rejected", version=version.name, job_id=spec.job_id,
                            reasons=verdict.reasons, metrics=metrics)
        logger.info("candidate_rejected", version=version.name, job_id=spec.job_id, reasons=verdict.reasons)
        outcome.status, outcome.reason = "rejected", reasons

    # 5. Retention.
    outcome.pruned = registry.prune()
    if outcome.pruned:
        logger.info("versions_pruned", versions=outcome.pruned)
    return outcome


# -- the whole cycle in the foreground ----------------------------------------------------------


def run_once(settings, progress: bool = True, *, ingest_first: bool = True,
             stream=None) -> CycleOutcome:
    """``lorad train --once``: ingest, live check, prepare, train, conclude — in this process.

    Args:
        progress: show a tqdm bar (on a terminal) fed from progress.jsonl.
        ingest_first: scan the configured sources before drawing the snapshot.
    """
    job_id = new_job_id()
    try:
        with training_lock(settings, f"lorad train --once, job {job_id}"):
            return _run_once(settings, job_id, progress, ingest_first, stream)
    except TrainingBusy as e:
        return CycleOutcome(job_id=job_id, status="busy", reason=str(e))


def _run_once(settings, job_id: str, progress: bool, ingest_first: bool, stream) -> CycleOutcome:
    from lorad.buffer.store import Buffer

    with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
        registry = open_registry(settings, buffer)
        if ingest_first and settings.store.sources:
            from lorad.ingest import ingest
            from lorad.sources import open_sources

            ingest(buffer, open_sources(settings.store), settings.buffer.batch_size)
        live = check_live(settings, buffer, registry)
        try:
            job_dir = prepare(settings, buffer, registry, job_id)
        except NothingToTrain as e:
            return CycleOutcome(job_id=job_id, status="skipped", reason=str(e), live=live)
        except CycleError as e:
            return CycleOutcome(job_id=job_id, status="failed", reason=str(e), live=live)
        bar = _ProgressBar(enabled=progress, stream=stream)
        try:
            code = run_worker(job_dir, on_progress=bar.update)
        finally:
            bar.close()
        outcome = conclude(settings, buffer, registry, job_dir)
        outcome.live = live
        if code != 0 and not outcome.reason:
            outcome.reason = f"worker exited with code {code}"
        return outcome


class _ProgressBar:
    """A tqdm bar over the worker's progress records (only on a terminal)."""

    def __init__(self, enabled: bool, stream=None):
        import sys

        self.stream = stream or sys.stderr
        self.enabled = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.bar = None

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        total, step = record.get("total_steps"), record.get("step") or 0
        if self.bar is None and total:
            self.bar = tqdm(total=total, desc="training", unit="step", file=self.stream)
        if self.bar is None:
            return
        self.bar.set_description(record.get("stage") or "training")
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        post = {}
        if record.get("loss") is not None:
            post["loss"] = f"{record['loss']:.4f}"
        if record.get("tokens_per_s"):
            post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
