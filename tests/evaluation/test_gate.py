"""The promotion gate is a pure function: plain dicts in, a Verdict out."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from lorad.evaluation.gate import Thresholds, Verdict, decide, decide_rollback

T = Thresholds(min_improvement=0.01, max_regression=0.05, min_heldout_examples=5)


def m(nll, examples=10, epsilon=None, **extra):
    d = {"nll": nll, "perplexity": math.exp(nll), "tokens": examples * 20, "examples": examples}
    if epsilon is not None:
        d["epsilon"] = epsilon
    return d | extra


def test_promotes_candidate_that_lowers_heldout_loss_enough():
    v = decide(m(2.0), m(1.9), T)
    assert v.promote
    assert any("2.0000 -> 1.9000" in r for r in v.reasons)


def test_rejects_candidate_that_regresses_heldout_loss():
    v = decide(m(2.0), m(2.1), T)
    assert not v.promote
    assert len(v.reasons) == 1 and "held-out loss 2.0000 -> 2.1000 (+5.00%)" in v.reasons[0]


def test_rejects_candidate_whose_improvement_is_below_min_improvement():
    v = decide(m(2.0), m(1.99), T)  # 0.5 % < 1 %
    assert not v.promote and "at least 1.00%" in v.reasons[0]


def test_too_few_heldout_examples_means_no_promotion_with_that_reason():
    v = decide(m(2.0, examples=3), m(1.0, examples=3), T)
    assert not v.promote
    assert v.reasons == ["only 3 held-out examples were scored; at least 5 are needed to promote"]


def test_rejects_candidate_whose_first_attempt_acceptance_falls_too_far():
    v = decide(m(2.0, epsilon=0.50), m(1.5, epsilon=0.40), T)
    assert not v.promote
    assert "first-attempt acceptance 50.0% -> 40.0%" in v.reasons[0]


def test_allows_acceptance_fall_within_max_regression():
    assert decide(m(2.0, epsilon=0.50), m(1.5, epsilon=0.46), T).promote


def test_epsilon_is_ignored_when_only_one_side_was_guarded():
    assert decide(m(2.0), m(1.5, epsilon=0.0), T).promote


def test_unhealthy_candidate_is_rejected_whatever_its_loss():
    v = decide(m(2.0), m(1.0, health={"ok": False, "reason": "logits contain NaN"}), T)
    assert not v.promote and v.reasons == ["health check failed: logits contain NaN"]


def test_non_finite_candidate_loss_is_rejected():
    v = decide(m(2.0), m(float("nan")), T)
    assert not v.promote and "not finite" in v.reasons[0]


def test_every_failed_check_is_a_reason():
    v = decide(m(2.0, examples=2, epsilon=0.9), m(2.5, examples=2, epsilon=0.1), T)
    assert not v.promote and len(v.reasons) == 3


def test_verdict_round_trips_through_a_dict():
    v = decide(m(2.0), m(1.0), T)
    assert Verdict.from_dict(v.as_dict()) == v


@given(a=st.floats(0.1, 10), c=st.floats(0.1, 10))
def test_promotion_follows_the_relative_loss_drop_exactly(a, c):
    assert decide(m(a), m(c), T).promote == ((a - c) / a >= T.min_improvement)


def test_rolls_back_active_that_is_worse_than_previous_beyond_threshold():
    assert decide_rollback(m(2.1), m(2.0), 0.02).roll_back  # +5 %
    assert not decide_rollback(m(2.01), m(2.0), 0.02).roll_back  # +0.5 %
    assert not decide_rollback(m(1.5), m(2.0), 0.02).roll_back
