"""Chains and filter policies: what each policy selects, in Python and in SQL alike."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad.buffer import traces
from lorad.buffer.traces import PolicyContext, PolicyError, facts, link, parse_policy, select
from lorad.cli import main
from lorad.config import EX_CONFIG
from lorad.sources.atomicguard import AtomicGuardSource
from lorad.sources.ingest import ingest


@pytest.fixture
def store_chains(buffer, fixture_store):
    ingest(buffer, [AtomicGuardSource("fixture", fixture_store)])
    rows = list(buffer.artifacts())
    groups = {}
    for row in rows:
        groups.setdefault((row["source"], row["workflow_id"], row["action_pair_id"]), []).append(row)
    return [c for g in groups.values() for c in link(g)]


def test_fixture_store_holds_10_first_try_25_refinements_and_5_exhausted_chains(store_chains):
    outcomes = [c.outcome for c in store_chains]
    assert len(store_chains) == 40
    assert (outcomes.count("first_try"), outcomes.count("refined"), outcomes.count("exhausted")) == (10, 25, 5)
    assert sum(len(c.rows) for c in store_chains) == 102


def test_policies_on_the_fixture_store_select_what_the_store_holds(store_chains):
    def n(text, **ctx):
        return len(select(store_chains, parse_policy(text), PolicyContext(**({"min_retries": 2} | ctx))))

    assert n("refinement") == 25
    assert n("all_successes") == 35
    assert n("first_try") == 10 and n("exhausted") == 5
    assert n("generator_only") == 40 and n("human_only") == 0
    assert n("action_pair:g_coder") == 40 and n("action_pair:other") == 0
    assert n("all", action_pairs=("other",)) == 0
    assert n("refinement and high_value", min_retries=1) == 25
    by_hand = sum(1 for c in store_chains if c.outcome == "refined" and c.retries >= 3)
    assert n("refinement and high_value", min_retries=3) == by_hand
    assert n("not refinement and not exhausted") == 10
    assert n("recent", since=0.0) == 40 and n("recent", since=4102444800.0) == 0  # 2100-01-01


# -- generated chains ------------------------------------------------------------------------------

ORIGINS = ("generated", "human", "imported")


@st.composite
def chains(draw):
    """A chain of 1-6 attempts: rejected ones, then maybe an accepted or a pending one."""
    n_rejected = draw(st.integers(0, 5))
    end = draw(st.sampled_from(["accepted", "pending", None] if n_rejected else ["accepted", "pending"]))
    statuses = ["rejected"] * n_rejected + ([end] if end else [])
    pair = draw(st.sampled_from(["g_coder", "g_test"]))
    workflow = f"w{draw(st.integers(0, 10**6))}"
    rows, prev = [], None
    for i, status in enumerate(statuses):
        aid = f"{workflow}-{i}"
        rows.append(
            {
                "id": i + 1,
                "source": "s",
                "locator": aid,
                "artifact_id": aid,
                "workflow_id": workflow,
                "action_pair_id": pair,
                "previous_attempt_id": prev,
                "attempt_number": i + 1,
                "status": status,
                "created_ts": draw(st.floats(0, 2e9)),
                "origin": draw(st.sampled_from(ORIGINS)),
                "content": f"attempt {i}",
                "specification": "spec",
            }
        )
        prev = aid
    (chain,) = link(rows)
    return chain


def definition(name: str, chain, ctx: PolicyContext) -> bool:
    """Each policy, written straight from its documented definition."""
    accepted = next((r for r in chain.rows if r["status"] == "accepted"), None)
    before = chain.rows[: chain.rows.index(accepted)] if accepted else chain.rows
    rejected = [r for r in before if r["status"] == "rejected"]
    last = accepted or chain.rows[-1]
    return {
        "refinement": accepted is not None and len(rejected) >= 1,
        "all_successes": accepted is not None,
        "first_try": accepted is not None and not rejected,
        "exhausted": accepted is None and all(r["status"] == "rejected" for r in chain.rows),
        "generator_only": all(r["origin"] == "generated" for r in chain.rows),
        "human_only": accepted is not None and accepted["origin"] == "human",
        "high_value": len(rejected) >= ctx.min_retries,
        "recent": last["created_ts"] >= ctx.since,
        "all": True,
        "action_pair:g_coder": chain.action_pair_id == "g_coder",
    }[name]


ATOMS = [
    "refinement",
    "all_successes",
    "first_try",
    "exhausted",
    "generator_only",
    "human_only",
    "high_value",
    "recent",
    "all",
    "action_pair:g_coder",
]
contexts = st.builds(PolicyContext, min_retries=st.integers(1, 4), since=st.floats(0, 2e9))


@given(chain=chains(), ctx=contexts)
def test_every_policy_selects_exactly_what_its_definition_says(chain, ctx):
    for name in ATOMS:
        assert parse_policy(name).matches(facts(chain), ctx) == definition(name, chain, ctx), name


expressions = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"not {e}"),
    ),
    max_leaves=6,
)


def _evaluate(expr: str, chain, ctx) -> bool:
    """The expression evaluated by Python's own and/or/not over the atoms' definitions."""
    env = {f"a{i}": definition(name, chain, ctx) for i, name in enumerate(ATOMS)}
    py = expr
    for i, name in sorted(enumerate(ATOMS), key=lambda t: -len(t[1])):
        py = py.replace(name, f"a{i}")
    return eval(py, {}, env)  # noqa: S307 - only our generated expressions


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(expr=expressions, chain_list=st.lists(chains(), min_size=1, max_size=8), ctx=contexts)
def test_combined_policies_agree_with_boolean_logic_in_python_and_in_sql(expr, chain_list, ctx):
    policy = parse_policy(expr)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE examples (i, outcome, retries, origin, generated_only, action_pair_id, created_ts)")
    for i, chain in enumerate(chain_list):
        f = facts(chain)
        db.execute(
            "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?)",
            (i, f["outcome"], f["retries"], f["origin"], f["generated_only"], f["action_pair_id"], f["created_ts"]),
        )
    where, params = policy.where(ctx)
    in_sql = {i for (i,) in db.execute(f"SELECT i FROM examples WHERE {where}", params)}
    in_python = {i for i, c in enumerate(chain_list) if policy.matches(facts(c), ctx)}
    expected = {i for i, c in enumerate(chain_list) if _evaluate(expr, c, ctx)}
    assert in_python == expected
    assert in_sql == expected


def test_precedence_is_not_then_and_then_or():
    tree = parse_policy("refinement or first_try and not human_only").tree
    assert tree == (
        "or",
        ("atom", "refinement", None),
        ("and", ("atom", "first_try", None), ("not", ("atom", "human_only", None))),
    )
    assert parse_policy("REFINEMENT AND Generator_Only").tree[0] == "and"


@pytest.mark.parametrize(
    "text, token",
    [
        ("refinment", "'refinment'"),
        ("refinement and", "ends too early"),
        ("(refinement or exhausted", "expected ')'"),
        ("refinement exhausted", "'exhausted'"),
        ("and refinement", "'and'"),
        ("action_pair:", "needs an id"),
        ("", "empty policy"),
    ],
)
def test_a_bad_policy_error_names_the_offending_token(text, token):
    with pytest.raises(PolicyError, match=token.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(text)


def test_invalid_policy_in_config_stops_with_exit_78_and_the_key_path(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('[selection]\npolicy = "refinement and sometimes"\n')
    assert main(["--config", str(path), "ingest"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert "selection.policy:" in err and "'sometimes'" in err


def test_links_attempts_without_previous_ids_by_attempt_number():
    rows = [
        {
            "id": i,
            "source": "s",
            "locator": f"l{i}",
            "artifact_id": f"a{i}",
            "workflow_id": "w",
            "action_pair_id": "g",
            "previous_attempt_id": None,
            "attempt_number": i,
            "status": s,
            "created_ts": float(i),
        }
        for i, s in ((1, "rejected"), (2, "rejected"), (3, "accepted"))
    ]
    (chain,) = link(rows)
    assert chain.outcome == traces.REFINED and chain.retries == 2 and chain.accepted["artifact_id"] == "a3"
