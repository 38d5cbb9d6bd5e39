"""The promotion gate is a pure function: plain dicts in, a Verdict out."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorad.evaluation.gate import Thresholds, Verdict, decide, decide_rollback, keep_last_phase, mcnemar_p, paired_test

T = Thresholds(min_improvement=0.01, confidence=0.95, min_heldout_examples=5)


def m(nll, examples=10, passes=None, **extra):
    """Metrics as evaluate returns them; ``passes`` is one bool per task (t0, t1, ...)."""
    d = {
        "nll": nll,
        "perplexity": math.exp(nll) if math.isfinite(nll) else nll,
        "tokens": examples * 20,
        "examples": examples,
    }
    if passes is not None:
        d["guard"] = [{"task_key": f"t{i}", "chain_id": f"c{i}", "accepted": ok} for i, ok in enumerate(passes)]
        d["epsilon"] = sum(passes) / len(passes) if passes else float("nan")
    return d | extra


def pairs(both: int, gained: int, lost: int, neither: int) -> tuple[list[bool], list[bool]]:
    """(active, candidate) outcomes with these counts of each kind of task."""
    active = [True] * both + [False] * gained + [True] * lost + [False] * neither
    candidate = [True] * both + [True] * gained + [False] * lost + [False] * neither
    return active, candidate


@pytest.mark.parametrize(
    "b, c, p",
    [
        (0, 0, 1.0),
        (5, 0, 2 / 32),  # 2 * C(5,0) / 2^5
        (0, 6, 2 / 64),
        (8, 2, 2 * (1 + 10 + 45) / 1024),  # 0.109375
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.0385742...
        (2, 10, 2 * (1 + 12 + 66) / 4096),
        (3, 3, 1.0),  # 2 * 42/64 > 1
        (1, 2, 1.0),  # 2 * 4/8
        (7, 1, 2 * (1 + 8) / 256),  # 0.0703125
    ],
)
def test_mcnemar_p_is_the_exact_two_sided_binomial_tail(b, c, p):
    assert mcnemar_p(b, c) == pytest.approx(p, rel=1e-12)


def test_paired_test_counts_gained_and_lost_tasks():
    active, candidate = pairs(both=3, gained=10, lost=2, neither=5)
    t = paired_test(m(1.0, passes=active), m(1.0, passes=candidate))
    assert (t.tasks, t.first, t.second, t.gained, t.lost) == (20, 5, 13, 10, 2)
    assert t.p == pytest.approx(158 / 4096)


def test_paired_test_uses_only_tasks_both_models_answered():
    a = m(1.0, passes=[True, False, False])
    c = m(1.0, passes=[True, True])
    t = paired_test(a, c)
    assert (t.tasks, t.gained, t.lost) == (2, 1, 0)


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
    assert v.reasons == ["only 3 held-out examples scored for loss; at least 5 are needed to promote"]


def test_rejects_candidate_significantly_worse_at_first_attempt_whatever_its_loss():
    active, candidate = pairs(both=4, gained=0, lost=6, neither=4)
    v = decide(m(2.0, passes=active), m(1.0, passes=candidate), T)
    assert not v.promote
    assert len(v.reasons) == 1
    assert "0 tasks gained, 6 lost (exact McNemar p = 0.03125" in v.reasons[0]
    assert "significantly worse" in v.reasons[0]


def test_a_fall_that_is_not_significant_does_not_veto_a_loss_improvement():
    """One lost task is noise: the old max_regression = 0 rejected such a candidate."""
    active, candidate = pairs(both=4, gained=0, lost=1, neither=5)
    v = decide(m(2.0, passes=active), m(1.5, passes=candidate), T)
    assert v.promote
    assert any("0 tasks gained, 1 lost (exact McNemar p = 1" in r for r in v.reasons)


def test_promotes_on_significantly_better_acceptance_without_a_loss_drop():
    active, candidate = pairs(both=2, gained=6, lost=0, neither=4)
    v = decide(m(2.0, passes=active), m(2.05, passes=candidate), T)
    assert v.promote
    assert any("6 tasks gained, 0 lost (exact McNemar p = 0.03125" in r for r in v.reasons)


def test_rejects_when_neither_loss_nor_acceptance_shows_progress():
    active, candidate = pairs(both=2, gained=3, lost=1, neither=4)
    v = decide(m(2.0, passes=active), m(2.0, passes=candidate), T)
    assert not v.promote
    assert len(v.reasons) == 1 and v.reasons[0].startswith("no improvement shown")
    assert "3 tasks gained, 1 lost (exact McNemar p = 0.625" in v.reasons[0]


def test_tasks_without_an_accepted_answer_count_for_acceptance():
    """Exhausted tasks have no loss to score but are answered; enough tasks, no loss: ε decides."""
    active, candidate = pairs(both=0, gained=7, lost=0, neither=3)
    v = decide(m(float("nan"), examples=0, passes=active), m(float("nan"), examples=0, passes=candidate), T)
    assert v.promote, v.reasons
    assert any("no held-out task has an accepted answer" in r for r in v.reasons)


def test_acceptance_is_ignored_when_only_one_side_was_guarded():
    assert decide(m(2.0), m(1.5, passes=[False] * 10), T).promote


def test_unhealthy_candidate_is_rejected_whatever_its_loss():
    v = decide(m(2.0), m(1.0, health={"ok": False, "reason": "logits contain NaN"}), T)
    assert not v.promote and v.reasons == ["health check failed: logits contain NaN"]


def test_non_finite_candidate_loss_is_rejected():
    v = decide(m(2.0), m(float("nan")), T)
    assert not v.promote and "not finite" in v.reasons[0]


def test_every_failed_check_is_a_reason():
    active, candidate = pairs(both=0, gained=0, lost=2, neither=0)
    v = decide(m(2.0, examples=2, passes=active), m(2.5, examples=2, passes=candidate), T)
    assert not v.promote and len(v.reasons) == 2  # too few tasks; no improvement


def test_verdict_round_trips_through_a_dict():
    v = decide(m(2.0), m(1.0), T)
    assert Verdict.from_dict(v.as_dict()) == v


@given(a=st.floats(0.1, 10), c=st.floats(0.1, 10))
def test_promotion_follows_the_relative_loss_drop_exactly(a, c):
    assert decide(m(a), m(c), T).promote == ((a - c) / a >= T.min_improvement)


@given(
    outcomes=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=5, max_size=60),
    nll_a=st.floats(0.1, 5),
    nll_c=st.floats(0.1, 5),
)
def test_swapping_candidate_and_active_flips_a_significant_decision(outcomes, nll_a, nll_c):
    """Never both promote; when the paired test is significant, exactly one of the two does."""
    a = m(nll_a, passes=[x for x, _ in outcomes])
    c = m(nll_c, passes=[y for _, y in outcomes])
    forward, backward = decide(a, c, T).promote, decide(c, a, T).promote
    assert not (forward and backward)
    t = paired_test(a, c)
    if t.p < 1 - T.confidence:
        assert forward != backward
        assert forward == (t.gained > t.lost)


def test_rolls_back_active_that_is_worse_than_previous_beyond_threshold():
    assert decide_rollback(m(2.1), m(2.0), 0.02, 0.95).roll_back  # +5 %
    assert not decide_rollback(m(2.01), m(2.0), 0.02, 0.95).roll_back  # +0.5 %
    assert not decide_rollback(m(1.5), m(2.0), 0.02, 0.95).roll_back


def test_rollback_follows_the_paired_test_where_acceptance_was_measured():
    previous, active = pairs(both=3, gained=0, lost=6, neither=1)  # active lost 6 tasks
    d = decide_rollback(m(1.0, passes=active), m(2.0, passes=previous), 0.02, 0.95)
    assert d.roll_back and "0 tasks gained, 6 lost" in d.reasons[0]
    # Significantly better at first attempt: kept, whatever its loss.
    previous, active = pairs(both=3, gained=6, lost=0, neither=1)
    d = decide_rollback(m(3.0, passes=active), m(2.0, passes=previous), 0.02, 0.95)
    assert not d.roll_back and "significantly better" in d.reasons[0]
    # No significant difference: the loss threshold decides, and the counts are still shown.
    previous, active = pairs(both=3, gained=1, lost=2, neither=4)
    d = decide_rollback(m(3.0, passes=active), m(2.0, passes=previous), 0.02, 0.95)
    assert d.roll_back and d.reasons[0].startswith("active held-out loss 3.0000 vs previous 2.0000")
    assert "1 tasks gained, 2 lost" in d.reasons[1]
    assert not decide_rollback(m(2.0, passes=active), m(2.0, passes=previous), 0.02, 0.95).roll_back


@pytest.mark.parametrize(
    "gained, lost, keep", [(4, 0, True), (2, 1, True), (1, 1, False), (0, 0, False), (0, 5, False)]
)
def test_sft_then_grpo_keeps_the_grpo_phase_only_when_it_gains_more_tasks_than_it_loses(gained, lost, keep):
    sft, grpo = pairs(both=10, gained=gained, lost=lost, neither=4)
    kept, reason = keep_last_phase(m(0.1, passes=sft), m(0.5, passes=grpo))  # GRPO's loss is higher: irrelevant
    assert kept is keep
    assert f"({gained} gained, {lost} lost)" in reason
    assert ("GRPO phase's adapter is the candidate" if keep else "SFT phase's adapter is the candidate") in reason


def test_sft_then_grpo_without_guarded_scores_keeps_the_grpo_phase():
    kept, reason = keep_last_phase(m(0.1), m(0.5))
    assert kept and "not both scored" in reason
