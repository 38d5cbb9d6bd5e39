"""Step 3 of a cycle: the dataset snapshot, written as the job directory, and plan.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lorad import events, release
from lorad.cycle.outcome import CycleError
from lorad.training.jobdir import JOB_FILE, atomic_write, build_spec, read_job, write_job

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer
    from lorad.config import Settings

log = structlog.get_logger()

PLAN_FILE = "plan.json"


class NothingToTrain(CycleError):
    "The snapshot has no training examples (nothing new, or the policy selects none)."


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
    def read(cls, job_dir) -> Plan:
        path = Path(job_dir) / PLAN_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise CycleError(f"{path}: cannot read the job's plan: {e}") from None


def job_dir_of(settings: Settings, job_id: str) -> Path:
    return settings.state.job(job_id)


def _digest(values) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()


def prepare(
    settings: Settings,
    buffer: Buffer,
    job_id: str,
    *,
    window_end: float | None = None,
    since: int | None = None,
    now: float | None = None,
) -> Path:
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
        buffer,
        sel,
        method="sft" if "grpo" in t.phases else t.method,
        n=t.train_examples,
        replay_ratio=t.replay_ratio,
        since_seq=since,
        max_heldout=settings.evaluation.max_heldout,
        now=now,
    )
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
            raise CycleError(
                f"adapter version {name} fails its sha256 check ({'; '.join(problems)}); "
                f"roll back or promote a sound version first"
            )
    bent = registry.pointer_problems()
    if bent:  # current reads as None: training would quietly start again from the base model
        raise CycleError(
            f"the registry's pointers are not believed ({'; '.join(bent)}); `lorad promote VERSION` repairs them"
        )
    rescore = settings.evaluation.rescore_active and cur is not None and prev is not None
    current_path = str(registry.path_of(cur)) if cur else None
    spec = build_spec(
        job_id,
        settings.state_dir,
        t,
        settings.evaluation,
        parent_adapter=current_path,
        reference_adapter=current_path,
        previous_adapter=str(registry.path_of(prev)) if rescore else None,
        window_end=window_end,
    )
    job_dir = job_dir_of(settings, job_id)
    write_job(job_dir, spec, snap.train, snap.heldout, prompts.rows if prompts else None)
    Plan(
        active=cur,
        previous=prev if rescore else None,
        since_seq=since,
        examples={
            "max_seq": snap.max_seq,
            "count": len(snap.example_seqs),
            "sha256": _digest(snap.example_seqs),
            "seqs": snap.example_seqs,
            "stats": snap.stats,
        },
        heldout={"count": len(snap.heldout), "sha256": _digest(r.get("chain_id") for r in snap.heldout)},
    ).write(job_dir)
    log.info(
        events.JOB_PREPARED,
        job_id=job_id,
        train_rows=len(snap.train),
        prompts=len(prompts.rows) if prompts else 0,
        heldout=len(snap.heldout),
        active=cur,
        rescore_previous=rescore,
    )
    return job_dir


def set_window_end(job_dir, window_end: float | None) -> None:
    """Give a paused job a new window end before it resumes."""
    spec = replace(read_job(job_dir), window_end=window_end)
    atomic_write(Path(job_dir) / JOB_FILE, json.dumps(spec.as_dict(), indent=2) + "\n")
