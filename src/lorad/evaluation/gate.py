"""The promotion gate: pure decisions over metrics, nothing else.

``decide(active, candidate, thresholds)`` says whether a candidate adapter may replace the
one serving now (or the bare base model), and why; ``decide_rollback(active, previous,
threshold)`` says whether the adapter serving now has become worse than the previous blessed
one on the current held-out set (a :class:`RollbackDecision`). Both take the metric dicts that
:func:`lorad.evaluation.metrics.evaluate` returns (``nll``, ``examples``, optionally
``epsilon``) and, for the candidate, the worker's health check under ``"health"``
(``{"ok": bool, "reason": str}``). Every reason is a sentence a person can read with its
figures in it; the verdict is stored with the version and in the audit table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Thresholds:
    """What a candidate must achieve (the [evaluation] keys of the same names)."""

    min_improvement: float
    max_regression: float
    min_heldout_examples: int


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: promote or not, with every reason that decided it."""

    promote: bool
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"promote": self.promote, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        return cls(bool(d["promote"]), list(d.get("reasons", [])))


def decide(active: dict, candidate: dict, thresholds: Thresholds) -> Verdict:
    """Promote only if every check holds; the reasons list the failed checks, or all passed ones.

    Checks, in order: the candidate's health (finite logits), enough held-out examples,
    a finite held-out loss, a relative loss drop of at least ``min_improvement`` against the
    active model, and — when both were guarded — a first-attempt acceptance drop of at most
    ``max_regression``.

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

    examples = min(int(candidate.get("examples", 0)), int(active.get("examples", 0)))
    if examples < thresholds.min_heldout_examples:
        failed.append(f"only {examples} held-out examples were scored; at least "
                      f"{thresholds.min_heldout_examples} are needed to promote")
    else:
        passed.append(f"{examples} held-out examples scored")

    a, c = active.get("nll", math.nan), candidate.get("nll", math.nan)
    if not _finite(c):
        failed.append(f"candidate held-out loss is not finite ({c})")
    elif not _finite(a) or a <= 0:
        failed.append(f"active held-out loss is not usable ({a}); cannot compare")
    else:
        drop = (a - c) / a
        sentence = (f"held-out loss {a:.4f} -> {c:.4f} ({-drop:+.2%}); "
                    f"a drop of at least {thresholds.min_improvement:.2%} is required")
        (passed if drop >= thresholds.min_improvement else failed).append(sentence)

    ea, ec = active.get("epsilon"), candidate.get("epsilon")
    if ea is not None and ec is not None:
        if not (_finite(ea) and _finite(ec)):
            failed.append(f"first-attempt acceptance could not be measured ({ea} vs {ec})")
        else:
            fall = ea - ec
            sentence = (f"first-attempt acceptance {ea:.1%} -> {ec:.1%} ({(ec - ea) * 100:+.1f} points); "
                        f"a fall of at most {thresholds.max_regression * 100:.1f} points is allowed")
            (passed if fall <= thresholds.max_regression + 1e-12 else failed).append(sentence)

    return Verdict(not failed, failed or passed)


@dataclass(frozen=True)
class RollbackDecision:
    """Whether to roll the active adapter back to the previous one, with the reasons."""

    roll_back: bool
    reasons: list[str] = field(default_factory=list)


def decide_rollback(active: dict, previous: dict, threshold: float) -> RollbackDecision:
    """Whether the active adapter is now worse than the previous blessed one.

    Roll back when the active adapter's held-out loss exceeds the previous one's by more
    than ``threshold`` (relative), scored on the same current held-out examples.
    """
    a, p = active.get("nll", math.nan), previous.get("nll", math.nan)
    if not (_finite(a) and _finite(p)) or p <= 0:
        return RollbackDecision(False, [f"cannot compare held-out losses (active {a}, previous {p})"])
    rise = (a - p) / p
    sentence = (f"active held-out loss {a:.4f} vs previous {p:.4f} ({rise:+.2%}); "
                f"rollback above +{threshold:.2%}")
    return RollbackDecision(rise > threshold, [sentence])


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
