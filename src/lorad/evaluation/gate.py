"""The promotion gate: pure decisions over metrics, nothing else.

``decide(active, candidate, thresholds)`` says whether a candidate adapter may replace the
one serving now (or the bare base model), and why; ``decide_rollback(active, previous,
threshold, confidence)`` says whether the adapter serving now has become worse than the
previous blessed one on the current held-out set (a :class:`RollbackDecision`). Both take the
metric dicts that :func:`lorad.evaluation.metrics.evaluate` returns (``nll``, ``examples``
and, when guarded, ``guard``: one ``{task_key, accepted}`` record per held-out task) and, for
the candidate, the worker's health check under ``"health"`` (``{"ok": bool, "reason": str}``).

First-attempt acceptance is compared as pairs: both models answered the same tasks, so only
the tasks where they disagree say anything (b: the second model passed and the first failed,
c: the reverse). :func:`paired_test` is the exact McNemar test on them: under "no
difference" each discordant task goes either way with probability 1/2, so the two-sided p is
``min(1, 2 * P(X <= min(b, c)))`` for X ~ Binomial(b + c, 1/2). Every reason is a sentence a
person can read with its figures in it; the verdict is stored with the version and in the
audit table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must achieve (the [evaluation] keys of the same names)."""

    min_improvement: float
    confidence: float
    min_heldout_examples: int


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: promote or not, with every reason that decided it."""

    promote: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"promote": self.promote, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: dict) -> Verdict:
        return cls(bool(d["promote"]), list(d.get("reasons", [])))


@dataclass(frozen=True)
class Paired:
    """Two models' first attempts on the same tasks, compared as pairs.

    ``gained`` (b): tasks the second model passed and the first failed; ``lost`` (c): the
    reverse; ``p``: the exact two-sided McNemar p-value; ``gained_tasks``/``lost_tasks``:
    their task keys.
    """

    tasks: int
    first: int  # tasks the first model passed
    second: int  # tasks the second model passed
    gained: int
    lost: int
    p: float
    gained_tasks: tuple[str, ...] = ()
    lost_tasks: tuple[str, ...] = ()

    def better(self, confidence: float) -> bool:
        """The second model passes significantly more tasks than the first."""
        return self.gained > self.lost and self.p < 1 - confidence

    def worse(self, confidence: float) -> bool:
        return self.lost > self.gained and self.p < 1 - confidence

    def sentence(self, first: str, second: str, confidence: float) -> str:
        n = self.tasks
        least = detectable(n, confidence)
        seen = (
            f"on {n} tasks a change shows from {least} tasks ({least / n:.0%}) gained with none lost"
            if least
            else f"on {n} tasks no change can be significant"
        )
        return (
            f"first-attempt acceptance {first} {self.first}/{n} ({self.first / n:.1%}) -> {second} "
            f"{self.second}/{n} ({self.second / n:.1%}): {self.gained} tasks gained, {self.lost} lost "
            f"(exact McNemar p = {self.p:.4g}; significant below {1 - confidence:.4g}; {seen})"
        )


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when none)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def detectable(tasks: int, confidence: float) -> int | None:
    """The fewest tasks first-attempt acceptance must gain (with none lost) on ``tasks`` paired
    held-out tasks for :func:`mcnemar_p` to call it significant at ``confidence``; None when no
    change on that many tasks can be (fewer than 6 at 95 %)."""
    return next((b for b in range(1, tasks + 1) if mcnemar_p(b, 0) < 1 - confidence), None)


def outcomes(metrics: dict) -> dict[str, bool] | None:
    """task key -> accepted, from a model's guard records (None when it was not guarded)."""
    records = metrics.get("guard")
    if records is None:
        return None
    return {r.get("task_key") or r.get("chain_id"): bool(r.get("accepted")) for r in records}


def paired_test(first: dict, second: dict) -> Paired | None:
    """The paired comparison of two models' first attempts on the tasks both answered.

    Returns None when either was not guarded or they share no task.
    """
    a, b = outcomes(first), outcomes(second)
    if a is None or b is None:
        return None
    shared = [k for k in a if k in b]
    if not shared:
        return None
    gained = tuple(k for k in shared if b[k] and not a[k])
    lost = tuple(k for k in shared if a[k] and not b[k])
    return Paired(
        tasks=len(shared),
        first=sum(a[k] for k in shared),
        second=sum(b[k] for k in shared),
        gained=len(gained),
        lost=len(lost),
        p=mcnemar_p(len(gained), len(lost)),
        gained_tasks=gained,
        lost_tasks=lost,
    )


def decide(active: dict, candidate: dict, thresholds: Thresholds) -> Verdict:
    """Promote only if the candidate is healthy, enough held-out tasks were scored, its
    first-attempt acceptance is not significantly worse, and either its held-out loss fell
    by ``min_improvement`` or its first-attempt acceptance is significantly better.

    The reasons list the failed checks (with the evidence that was weighed), or every passed
    one. Enough tasks: at least ``min_heldout_examples`` answered by both (when guarded),
    else scored for loss.

    Args:
        active: metrics of the adapter serving now, or of the bare base model.
        candidate: metrics of the candidate, optionally with ``"health"``.
        thresholds: the gate's limits.
    """
    passed: list[str] = []
    failed: list[str] = []

    health = candidate.get("health")
    if health is not None:
        ok = health if isinstance(health, bool) else bool(health.get("ok"))
        reason = "" if isinstance(health, bool) else health.get("reason", "")
        if ok:
            passed.append("health check passed")
        else:
            failed.append(f"health check failed: {reason or 'unhealthy'}")

    pairs = paired_test(active, candidate)
    guarded = outcomes(active) is not None and outcomes(candidate) is not None
    if pairs is not None:
        scored, what = pairs.tasks, "held-out tasks answered by both models"
    else:
        scored = min(int(candidate.get("examples", 0)), int(active.get("examples", 0)))
        what = "held-out examples scored for loss"
    if scored < thresholds.min_heldout_examples:
        failed.append(f"only {scored} {what}; at least {thresholds.min_heldout_examples} are needed to promote")
    else:
        passed.append(f"{scored} {what}")

    # Held-out loss: one way to show progress. A NaN loss over real examples is a broken model.
    a, c = active.get("nll", math.nan), candidate.get("nll", math.nan)
    loss_examples = min(int(candidate.get("examples", 0)), int(active.get("examples", 0)))
    improved, loss_sentence = False, None
    if loss_examples and not _finite(c):
        failed.append(f"candidate held-out loss is not finite ({c})")
    elif not loss_examples:
        loss_sentence = "no held-out task has an accepted answer to score the loss on"
    elif not _finite(a) or a <= 0:
        loss_sentence = f"active held-out loss is not usable ({a}); cannot compare"
    else:
        drop = (a - c) / a
        improved = drop >= thresholds.min_improvement
        loss_sentence = (
            f"held-out loss {a:.4f} -> {c:.4f} ({-drop:+.2%}); "
            f"a drop of at least {thresholds.min_improvement:.2%} is required"
        )

    # First-attempt acceptance, as pairs: the other way to show progress, and a veto.
    better, eps_sentence = False, None
    if pairs is not None:
        eps_sentence = pairs.sentence("active", "candidate", thresholds.confidence)
        if pairs.worse(thresholds.confidence):
            failed.append(eps_sentence + ": significantly worse")
            eps_sentence = None
        else:
            better = pairs.better(thresholds.confidence)
    elif guarded:
        failed.append("first-attempt acceptance could not be compared: the models answered no task in common")

    if improved or better:
        passed += [s for s in (loss_sentence, eps_sentence) if s]
    elif loss_sentence or eps_sentence:
        failed.append(
            "no improvement shown: "
            + "; ".join(s for s in (loss_sentence, eps_sentence) if s)
            + ("; first-attempt acceptance is not significantly better" if eps_sentence else "")
        )

    return Verdict(not failed, failed or passed)


@dataclass(frozen=True)
class RollbackDecision:
    """Whether to roll the active adapter back to the previous one, with the reasons."""

    roll_back: bool
    reasons: list[str] = field(default_factory=list)


def decide_rollback(active: dict, previous: dict, threshold: float, confidence: float) -> RollbackDecision:
    """Whether the active adapter is now worse than the previous blessed one.

    Both are scored on the same current held-out tasks. Where first-attempt acceptance was
    measured for both, the paired test speaks first: roll back when the active adapter is
    significantly worse, keep it when it is significantly better. Otherwise (no guard, or
    no significant difference) roll back when its held-out loss exceeds the previous one's
    by more than ``threshold`` (relative).
    """
    pairs = paired_test(previous, active)
    tail = []
    if pairs is not None:
        eps = pairs.sentence("previous", "active", confidence)
        if pairs.worse(confidence):
            return RollbackDecision(True, [eps + "; the active adapter is significantly worse"])
        if pairs.better(confidence):
            return RollbackDecision(False, [eps + "; the active adapter is significantly better"])
        tail = [eps + "; no significant difference"]
    a, p = active.get("nll", math.nan), previous.get("nll", math.nan)
    if not (_finite(a) and _finite(p)) or p <= 0:
        return RollbackDecision(False, [f"cannot compare held-out losses (active {a}, previous {p})"] + tail)
    rise = (a - p) / p
    sentence = f"active held-out loss {a:.4f} vs previous {p:.4f} ({rise:+.2%}); rollback above +{threshold:.2%}"
    return RollbackDecision(rise > threshold, [sentence] + tail)


def keep_last_phase(earlier: dict, last: dict) -> tuple[bool, str]:
    """SFT+GRPO: whether the job offers the GRPO phase's adapter (``last``) rather than the SFT
    phase's (``earlier``), both scored on the same held-out tasks.

    Kept only when it passes more of them first time than it fails that the SFT phase passed:
    GRPO imitates no accepted answer, so its held-out loss says little, and without a gain in
    ε its drift from the SFT adapter is not worth serving. Without guarded scores for both
    (nothing to compare) the GRPO phase is kept.

    Returns:
        (keep, the reason, with the paired counts).
    """
    pairs = paired_test(earlier, last)
    if pairs is None:
        return True, "the phases were not both scored by the guard; the GRPO phase's adapter is kept"
    counts = (
        f"held-out first attempts SFT phase {pairs.first}/{pairs.tasks} -> GRPO phase "
        f"{pairs.second}/{pairs.tasks} ({pairs.gained} gained, {pairs.lost} lost)"
    )
    if pairs.gained > pairs.lost:
        return True, f"{counts}: the GRPO phase's adapter is the candidate"
    return False, f"{counts}: no gain, so the SFT phase's adapter is the candidate"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
