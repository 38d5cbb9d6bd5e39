"""Step 5 of a cycle: decide on a finished job, in named steps.

:func:`conclude` reads the job (job.json, plan.json, result.json) and runs :class:`Conclusion`'s
steps in order: ``check_rollback`` (is the adapter serving now worse than the previous blessed
one on today's held-out set?), ``make_version`` (the gate's verdict, and every finished
candidate a registry version, rejected ones too), ``promote_or_reject`` (the pointer and the
publish hooks, or the rejection event), ``prune`` (retention). Each step records what it did
in the job's conclusion journal (:mod:`lorad.cycle.journal`), so a conclusion run again after a
crash at any point finishes what was recorded: one version, one promotion, its hooks run.
"""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lorad import events, release
from lorad.cycle.journal import Journal, move_once, publish_once, version_of
from lorad.cycle.outcome import Outcome
from lorad.cycle.plan import Plan
from lorad.evaluation.gate import Thresholds, Verdict, decide, decide_rollback
from lorad.release import gguf
from lorad.training.jobdir import ADAPTER_DIR, JobError, JobSpec, Result, read_job, read_result

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer
    from lorad.config import Settings

log = structlog.get_logger()


def conclude(
    settings: Settings, buffer: Buffer, job_dir, *, now: datetime | None = None, cancel: threading.Event | None = None
) -> Outcome:
    """Decide on a finished job: rollback check, gate, new version, promote or reject, publish, prune.

    Idempotent: run again on the same job (after a crash at any point) it finishes the
    conclusion its journal recorded and returns the same outcome.

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
    outcome = _outcome_of(spec, plan, result)
    if not result.succeeded:
        return outcome
    outcome.metrics = result.metrics
    steps = Conclusion(settings, buffer, job_dir, spec, plan, result, outcome, cancel)
    steps.check_rollback()
    version = steps.make_version(now)
    steps.promote_or_reject(version)
    steps.prune()
    return outcome


def _outcome_of(spec: JobSpec, plan: Plan, result: Result) -> Outcome:
    """The outcome as the worker left it: its status and what it trained."""
    stats = plan.examples.get("stats") or {}
    outcome = Outcome(spec.job_id, "failed" if result.status == "succeeded" else result.status, result.reason)
    outcome.training = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "train_seconds": result.train_seconds,
        "tokens": result.tokens,
        "train_rows": stats.get("rows"),
        "new": stats.get("new"),
        "replayed": stats.get("replayed"),
    }
    if result.phases:
        outcome.training["phases"] = [
            {k: p[k] for k in ("method", "steps", "final_loss", "train_seconds", "kept", "decision") if k in p}
            for p in result.phases
        ]
    return outcome


class Conclusion:
    """The steps of one job's conclusion, sharing what they read; each is journaled."""

    def __init__(
        self,
        settings: Settings,
        buffer: Buffer,
        job_dir: Path,
        spec: JobSpec,
        plan: Plan,
        result: Result,
        outcome: Outcome,
        cancel: threading.Event | None,
    ):
        self.settings, self.buffer, self.job_dir = settings, buffer, job_dir
        self.spec, self.plan, self.result, self.outcome, self.cancel = spec, plan, result, outcome, cancel
        self.metrics = result.metrics
        self.registry = release.open_registry(settings, buffer)
        self.journal = Journal(job_dir)

    def check_rollback(self) -> None:
        """1. Re-scoring: roll the active adapter back when it now scores worse than the previous
        blessed one; the candidate is then compared with the version rolled back to."""
        journal, registry, plan, metrics = self.journal, self.registry, self.plan, self.metrics
        if "checked" not in journal:
            e = self.settings.evaluation
            check_out, baseline, baseline_version = None, "active", plan.active
            cur = registry.current()
            intent = journal.get("rollback_intent")
            if intent is None and metrics and "previous" in metrics and cur and cur == plan.active:
                check = decide_rollback(metrics["active"], metrics["previous"], e.rollback_threshold, e.confidence)
                check_out = {
                    "kind": "rescore",
                    "active": cur,
                    "previous": plan.previous,
                    "rolled_back": False,
                    "reasons": check.reasons,
                }
                if check.roll_back and registry.previous() == plan.previous:
                    intent = {
                        "action": "rolled_back",
                        "to": plan.previous,
                        "from": cur,
                        "previous": plan.previous,
                        "reason": "re-scored: " + check.reasons[0],
                        "check": check_out,
                    }
            if intent is not None:
                scored = metrics or {}  # an intent is recorded only with both scores
                change = move_once(
                    journal,
                    registry,
                    "rollback",
                    intent,
                    lambda: registry.rollback(
                        None,
                        reason=intent["reason"],
                        job_id=self.spec.job_id,
                        metrics={"active": scored["active"], "previous": scored["previous"]},
                    ),
                )
                report = publish_once(journal, self.settings, self.buffer, "rollback", change, self.cancel)
                check_out = intent["check"] | {"rolled_back": True, "to": change.version, "publish": report}
                baseline, baseline_version = "previous", change.version
            journal.record(
                "checked", {"rollback": check_out, "baseline": baseline, "baseline_version": baseline_version}
            )
        checked = journal.get("checked")
        self.outcome.rollback = checked["rollback"]
        self.outcome.baseline, self.outcome.baseline_version = checked["baseline"], checked["baseline_version"]

    def make_version(self, now: datetime | None):
        """2-3. The gate's verdict on the candidate, and the registry version that holds both
        (found again by job id after a crash, never made twice)."""
        version = version_of(self.registry, self.journal, self.spec.job_id)
        if version is None:
            version = self.registry.create(self.job_dir / ADAPTER_DIR, self._record(self._verdict()), now=now)
        # The version holds its own copy of merged.gguf; the job's is a whole model more on disk.
        gguf.drop_merged(self.job_dir / ADAPTER_DIR)
        if "version" not in self.journal:
            self.journal.record("version", version.name)
        self.outcome.verdict, self.outcome.version = Verdict.from_dict(version.verdict).as_dict(), version.name
        return version

    def _verdict(self) -> Verdict:
        e, metrics = self.settings.evaluation, self.metrics
        baseline, baseline_version = self.outcome.baseline, self.outcome.baseline_version
        if not metrics or "candidate" not in metrics:
            return Verdict(
                False,
                [
                    "no held-out metrics (empty held-out set or evaluation off); "
                    f"at least {e.min_heldout_examples} held-out examples are needed to promote"
                ],
            )
        candidate = dict(metrics["candidate"])
        if self.result.health is not None:
            candidate["health"] = self.result.health
        verdict = decide(
            metrics[baseline], candidate, Thresholds(e.min_improvement, e.confidence, e.min_heldout_examples)
        )
        cur = self.registry.current()
        if cur != baseline_version:
            return Verdict(
                False,
                [
                    f"the active adapter changed during the job ({baseline_version or 'base model'}"
                    f" -> {cur or 'base model'}); the comparison is stale"
                ]
                + verdict.reasons,
            )
        return verdict

    def _record(self, verdict: Verdict) -> dict:
        """lorad.json of the new version (and its GGUF export, with a gguf or ollama hook)."""
        spec, plan, result = self.spec, self.plan, self.result
        record = {
            "job_id": spec.job_id,
            "base_model": spec.base_model,
            "base_model_path": result.base_model,
            "method": spec.method,
            "hyperparameters": {
                k: getattr(spec, k)
                for k in (
                    "lora_r",
                    "lora_alpha",
                    "lora_dropout",
                    "target_modules",
                    "learning_rate",
                    "max_steps",
                    "epochs",
                    "batch_size",
                    "grad_accum",
                    "max_seq_length",
                    "seed",
                    "packing",
                    *(("grpo_steps", "grpo_learning_rate") if spec.method == "sft+grpo" else ()),
                )
            },
            "parent": Path(spec.parent_adapter).name if spec.parent_adapter else None,
            "training": self.outcome.training,
            "examples": {k: plan.examples.get(k) for k in ("max_seq", "count", "sha256", "seqs")}
            | {"stats": plan.examples.get("stats") or {}},
            "heldout": plan.heldout,
            "compared_with": {"label": self.outcome.baseline, "version": self.outcome.baseline_version},
            "metrics": self.metrics,
            "health": result.health,
            "verdict": verdict.as_dict(),
        }
        exported = gguf.version_export(
            self.settings.publish,
            self.job_dir / ADAPTER_DIR,
            result.base_model,
            self.settings.training.base_model,
            name=f"lorad {spec.job_id}",
        )
        if exported is not None:
            record["gguf"] = exported
            if "refused" in exported:
                log.warning(events.GGUF_EXPORT_REFUSED, job_id=spec.job_id, reason=exported["refused"])
            else:
                log.info(events.GGUF_EXPORTED, job_id=spec.job_id, sha256=exported["sha256"], base=exported["base"])
            merged = exported.get("merged")
            if merged is not None and "refused" in merged:
                log.warning(events.GGUF_MERGE_REFUSED, job_id=spec.job_id, reason=merged["refused"])
            elif merged is not None:
                log.info(events.GGUF_MERGED, job_id=spec.job_id, sha256=merged["sha256"], bytes=merged["bytes"])
        return record

    def promote_or_reject(self, version) -> None:
        """4. Promote the version and run the publish hooks (a failed required one reverts it:
        the job ends rejected), or record the rejection."""
        journal, registry, outcome = self.journal, self.registry, self.outcome
        verdict = Verdict.from_dict(version.verdict)
        reasons = "; ".join(verdict.reasons)
        if not verdict.promote:
            if "rejection_recorded" not in journal:
                self.buffer.record_event(
                    events.CANDIDATE_REJECTED,
                    version=version.name,
                    job_id=self.spec.job_id,
                    reasons=verdict.reasons,
                    metrics=self.metrics,
                )
                log.info(
                    events.CANDIDATE_REJECTED, version=version.name, job_id=self.spec.job_id, reasons=verdict.reasons
                )
                journal.record("rejection_recorded", True)
            outcome.status, outcome.reason = "rejected", reasons
            return
        intent = {
            "action": "promoted",
            "to": version.name,
            "from": registry.current(),
            "previous": registry.previous(),
            "reason": reasons,
        }
        change = move_once(
            journal,
            registry,
            "promotion",
            intent,
            lambda: registry.promote(
                version.name, reason=reasons, job_id=self.spec.job_id, reasons=verdict.reasons, metrics=self.metrics
            ),
        )
        report = publish_once(journal, self.settings, self.buffer, "promotion", change, self.cancel)
        outcome.publish = report["results"]
        if report["reverted"]:
            outcome.status, outcome.reason = "rejected", report["reverted"]["reason"]
        else:
            outcome.status, outcome.reason = "promoted", reasons
        if report.get("cancelled"):
            outcome.reason += "; its publish hooks were cancelled by request"

    def prune(self) -> None:
        """5. Retention: the versions the registry no longer keeps go."""
        self.outcome.pruned = self.registry.prune()
        if self.outcome.pruned:
            log.info(events.VERSIONS_PRUNED, versions=self.outcome.pruned)
