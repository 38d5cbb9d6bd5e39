"""The examples table: refresh, frozen split by task, incremental dedup, count_new, snapshots."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorad.buffer import examples, split
from lorad.buffer.store import Buffer
from lorad.config import SelectionSettings
from lorad.demo import synthetic
from lorad.sources.atomicguard import AtomicGuardSource
from lorad.sources.ingest import ingest

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
SEL = SelectionSettings(heldout_fraction=0.3, dedup_similarity=0.9)


def snapshot(buffer, selection=SEL, *, method="sft", n=100, replay_ratio=0.5, **kw):
    return examples.build_snapshot(buffer, selection, method=method, n=n, replay_ratio=replay_ratio, **kw)


def add_task(
    store,
    i: int,
    *,
    spec: str | None = None,
    answer: str | None = None,
    retries: int = 1,
    accepted: bool = True,
    day: int = 0,
    workflow: str | None = None,
    family: str | None = None,
) -> None:
    spec = spec or f"Write a Python function `f{i}(x)` that returns x times {i} plus {i * 7 % 11}."
    answer = answer or f'def f{i}(x: int) -> int:\n    """Task {i}."""\n    return x * {i} + {i * 7 % 11}\n'
    attempts = [
        (f"def f{i}(x):\n    return x * {i} + {r}  # try {r}\n", "rejected", f"f{i}(1) wrong, try {r}")
        for r in range(retries)
    ]
    if accepted:
        attempts.append((answer, "accepted", "All tests passed"))
    for obj in synthetic.chain(
        workflow_id=workflow or f"wf-{i}-{day}",
        specification=spec,
        attempts=attempts,
        start=T0 + timedelta(days=day, minutes=i),
        metadata={"family": family} if family else None,
    ):
        synthetic.write(store, obj)


def sync(buffer, store, selection=SEL):
    ingest(buffer, [AtomicGuardSource("s", store, settle_seconds=0)])
    return examples.refresh(buffer, selection)


def rows(buffer) -> dict[str, dict]:
    cur = buffer.conn.execute(
        "SELECT chain_id, seq, split, duplicate_of, duplicate, task_key, outcome, retries FROM examples"
    )
    names = [d[0] for d in cur.description]
    return {r[0]: dict(zip(names, r, strict=True)) for r in cur}


def test_migration_builds_the_examples_tables_on_a_fresh_in_memory_database():
    with Buffer(":memory:") as b:
        tables = {r[0] for r in b.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"examples", "example_bands", "splits", "examples_state"} <= tables
        assert b.conn.execute("SELECT 1 FROM _migrations WHERE name = '0002_examples'").fetchone()


def test_refresh_on_the_fixture_store_makes_one_example_per_decided_chain_and_is_idempotent(buffer, fixture_store):
    report = sync(buffer, fixture_store)
    assert report.added == 40 and report.skipped == {}
    outcomes = [r["outcome"] for r in rows(buffer).values()]
    assert (outcomes.count("first_try"), outcomes.count("refined"), outcomes.count("exhausted")) == (10, 25, 5)
    before = rows(buffer)
    again = examples.refresh(buffer, SEL)
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    assert rows(buffer) == before


def test_chain_with_empty_specification_is_skipped_with_that_reason(buffer, tmp_path):
    store = tmp_path / "store"
    add_task(store, 1)
    add_task(store, 2, spec=" ")
    report = sync(buffer, store)
    assert report.added == 1 and report.skipped == {"empty_specification": 1}


def test_pending_chain_waits_and_becomes_an_example_with_a_new_seq_when_decided(buffer, tmp_path):
    store = tmp_path / "store"
    add_task(store, 1)
    objs = synthetic.chain(
        workflow_id="wf-p",
        specification="Write p(x) returning x.",
        attempts=[("def p(x): return 0", "rejected", "p(1) returned 0"), ("def p(x): return x", "pending", "")],
        start=T0,
    )
    for o in objs:
        synthetic.write(store, o)
    report = sync(buffer, store)
    assert report.skipped == {"open": 1} and report.added == 1
    first_max = max(r["seq"] for r in rows(buffer).values())
    accepted = synthetic.artifact(
        workflow_id="wf-p",
        content="def p(x): return x",
        status="accepted",
        attempt_number=2,
        previous_attempt_id=objs[0]["artifact_id"],
        specification="Write p(x) returning x.",
        artifact_id=objs[1]["artifact_id"],
        created_at=T0 + timedelta(seconds=1),
    )
    synthetic.write(store, accepted)
    report = sync(buffer, store)
    assert report.added == 1 and report.skipped == {}
    new = [r for r in rows(buffer).values() if r["seq"] > first_max]
    assert len(new) == 1 and new[0]["outcome"] == "refined"


def test_seq_only_grows_and_count_new_counts_train_examples_after_it(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(20):
        add_task(store, i)
    sync(buffer, store)
    first = rows(buffer)
    mark = max(r["seq"] for r in first.values())
    assert examples.count_new(buffer, mark) == 0
    for i in range(20, 50):
        add_task(store, i, day=1)
    sync(buffer, store)
    later = rows(buffer)
    assert all(later[c]["seq"] == r["seq"] for c, r in first.items())
    fresh = [r for c, r in later.items() if c not in first]
    assert all(r["seq"] > mark for r in fresh)
    expected = sum(1 for r in fresh if r["split"] == "train" and r["duplicate_of"] is None)
    assert examples.count_new(buffer, mark) == expected > 0
    assert examples.count_new(buffer, 0) == sum(1 for r in later.values() if r["split"] == "train")


def test_one_task_never_sits_on_both_sides_and_contamination_check_is_clean(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(30):
        add_task(store, i)
        add_task(store, i, workflow=f"again-{i}", day=2, answer=f"def f{i}(x):\n    return {i} * x + {i * 7 % 11}\n")
    sync(buffer, store)
    sides: dict[str, set] = {}
    for r in rows(buffer).values():
        sides.setdefault(r["task_key"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert {"train", "heldout"} == set().union(*sides.values())
    assert split.contamination(buffer.conn) == []


def test_contamination_check_reports_a_heldout_task_also_in_training(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(12):
        add_task(store, i)
    sync(buffer, store)
    held = buffer.conn.execute("SELECT chain_id, task_key FROM examples WHERE split = 'heldout' LIMIT 1").fetchone()
    assert held is not None
    with buffer.transaction() as conn:  # simulate a leak: the same task also in training
        conn.execute(
            "UPDATE examples SET task_key = ? WHERE chain_id = "
            "(SELECT chain_id FROM examples WHERE split = 'train' LIMIT 1)",
            (held[1],),
        )
    leaks = split.contamination(buffer.conn)
    assert [(x["chain_id"], x["leak"]) for x in leaks] == [(held[0], "specification")]


def test_split_is_frozen_when_the_fraction_changes_and_the_buffer_grows(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(40):
        add_task(store, i)
    sync(buffer, store)
    first = {c: r["split"] for c, r in rows(buffer).items()}
    for i in range(40, 60):
        add_task(store, i, day=1)
    add_task(store, 3, workflow="repeat-3", day=1)  # an old task, again
    sync(buffer, store, SelectionSettings(heldout_fraction=0.9))
    later = rows(buffer)
    assert all(later[c]["split"] == side for c, side in first.items())
    repeat = next(
        r
        for r in later.values()
        if r["task_key"] == split.task_key("Write a Python function `f3(x)` that returns x times 3 plus 10.")
        and r["chain_id"] not in first
    )
    original = next(r for c, r in later.items() if c in first and r["task_key"] == repeat["task_key"])
    assert repeat["split"] == original["split"]


def test_a_newer_duplicate_replaces_the_older_and_the_outcome_matches_a_fresh_build(tmp_path):
    store = tmp_path / "store"
    for i in range(25):
        add_task(store, i)
    with Buffer(tmp_path / "grown.sqlite3") as grown:
        sync(grown, store)
        assert examples.totals(grown.conn)["duplicates"] == 0
        add_task(store, 5, workflow="dup-exact", day=3)  # same task, same answer: exact duplicate
        add_task(
            store,
            7,
            workflow="dup-near",
            day=3,  # same task, answer with a comment: near duplicate
            answer='def f7(x: int) -> int:\n    """Task 7."""\n    return x * 7 + 5  # ok\n',
        )
        for i in range(25, 35):
            add_task(store, i, day=3)
        report = sync(grown, store)
        assert report.duplicates == {"exact": 1, "near": 1}
        grown_rows = rows(grown)
        assert examples.refresh(grown, SEL).duplicates == {"exact": 0, "near": 0}  # re-run: stable
        assert rows(grown) == grown_rows
    with Buffer(tmp_path / "fresh.sqlite3") as fresh:
        sync(fresh, store)
        fresh_rows = rows(fresh)
    dropped = {c for c, r in grown_rows.items() if r["duplicate_of"] is not None}
    assert dropped == {c for c, r in fresh_rows.items() if r["duplicate_of"] is not None}
    assert len(dropped) == 2
    kinds = sorted(r["duplicate"] for r in grown_rows.values() if r["duplicate"])
    assert kinds == ["exact", "near"]
    assert {c: r["split"] for c, r in grown_rows.items()} == {c: r["split"] for c, r in fresh_rows.items()}
    with Buffer(tmp_path / "grown.sqlite3") as grown:  # the older copy points at the newer one
        kept = grown.conn.execute(
            "SELECT d.workflow_id, k.workflow_id FROM examples d JOIN examples k ON k.id = d.duplicate_of"
        ).fetchall()
    assert sorted(kept) == [("wf-5-0", "dup-exact"), ("wf-7-0", "dup-near")]


def test_snapshot_rows_have_the_documented_shapes(buffer, fixture_store):
    sync(buffer, fixture_store)
    refinements = dataclasses.replace(SEL, seed=1, policy="refinement", conditioning="history")
    snap = snapshot(buffer, refinements, since_seq=0)
    assert snap.stats["new"] == len(snap.example_seqs) == len(snap.train) > 0
    for row in snap.train:
        assert [m["role"] for m in row["prompt"]][-1] == "user"
        assert row["completion"][0]["role"] == "assistant"
        assert row["metadata"]["outcome"] == "refined" and row["metadata"]["split"] == "train"
        assert row["metadata"]["conditioning"] == "history"
    assert snap.heldout
    train_chains = {r["metadata"]["chain_id"] for r in snap.train}
    for row in snap.heldout:
        assert set(row) >= {"prompt", "completion", "specification", "chain_id", "task_key"}
        assert "Previous attempts" not in row["prompt"][-1]["content"]
        assert row["prompt"][-1]["content"] == row["specification"]
        assert row["chain_id"] not in train_chains
    assert snap.max_seq == buffer.conn.execute("SELECT max(seq) FROM examples WHERE split = 'train'").fetchone()[0]
    dpo = snapshot(buffer, refinements, method="dpo")
    assert dpo.train and all(set(r) == {"prompt", "chosen", "rejected", "metadata"} for r in dpo.train)
    kto = snapshot(buffer, SelectionSettings(policy="refinement or exhausted", seed=1), method="kto")
    labels = [r["label"] for r in kto.train]
    assert True in labels and False in labels
    assert any(r["metadata"]["outcome"] == "exhausted" for r in kto.train)


@pytest.mark.parametrize(
    "conditioning, refined_rows",
    [("both", ["first_attempt", "history"]), ("first_attempt", ["first_attempt"]), ("history", ["history"])],
)
def test_conditioning_chooses_the_prompts_a_refinement_trains_under(buffer, tmp_path, conditioning, refined_rows):
    """A refinement gives a first-attempt row, a history row, or both; a first-try success one row."""
    store = tmp_path / "store"
    for i in range(12):
        add_task(store, i, retries=0 if i % 2 else 2)
    sel = dataclasses.replace(SEL, policy="all_successes", conditioning=conditioning)
    sync(buffer, store, sel)
    snap = snapshot(buffer, sel)
    by_chain: dict[str, list[dict]] = {}
    for row in snap.train:
        by_chain.setdefault(row["metadata"]["chain_id"], []).append(row)
    assert len(by_chain) == len(snap.example_seqs) > 0
    for chain_rows in by_chain.values():
        kinds = sorted(r["metadata"]["conditioning"] for r in chain_rows)
        outcome = chain_rows[0]["metadata"]["outcome"]
        assert kinds == (refined_rows if outcome == "refined" else ["first_attempt"])
        for r in chain_rows:
            user = r["prompt"][-1]["content"]
            assert ("Previous attempts and feedback" in user) == (r["metadata"]["conditioning"] == "history")
            if r["metadata"]["conditioning"] == "first_attempt":
                assert user.startswith("Write a Python function") and "try 0" not in user
        assert len({r["completion"][0]["content"] for r in chain_rows}) == 1  # the same accepted answer
    assert {r[0]["metadata"]["outcome"] for r in by_chain.values()} == {"refined", "first_try"}
    assert snap.stats["rows"] == len(snap.train) and snap.stats["conditioning"] == conditioning


def test_heldout_scores_every_task_first_try_and_exhausted_too_whatever_the_policy(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(40):
        add_task(store, i, retries=i % 3, accepted=i % 5 != 0)  # first-try, refined and exhausted
    sel = dataclasses.replace(SEL, policy="refinement")
    sync(buffer, store, sel)
    held_tasks = {
        r[0]: r[1]
        for r in buffer.conn.execute(
            "SELECT task_key, group_concat(outcome) FROM examples WHERE split = 'heldout' GROUP BY task_key"
        )
    }
    snap = snapshot(buffer, sel)
    assert len(snap.heldout) == len(held_tasks) and {r["task_key"] for r in snap.heldout} == set(held_tasks)
    outcomes = {r["metadata"]["outcome"] for r in snap.heldout}
    assert outcomes == {"first_try", "refined", "exhausted"}, outcomes
    for row in snap.heldout:
        assert (row["completion"] is None) == (row["metadata"]["outcome"] == "exhausted")
        assert "Previous attempts" not in row["prompt"][-1]["content"]
    assert snap.stats["heldout_answered"] == sum(1 for r in snap.heldout if r["completion"])


def test_heldout_has_one_row_per_task_preferring_an_accepted_chain(buffer, tmp_path):
    store = tmp_path / "store"
    spec = "Write a Python function `twice(x)` that returns x times two."
    for i in range(30):
        add_task(store, i)
    # The same task three times: exhausted first, then accepted twice.
    add_task(store, 100, spec=spec, accepted=False, day=1)
    add_task(store, 101, spec=spec, answer="def twice(x):\n    return 2 * x\n", day=2)
    add_task(store, 102, spec=spec, answer="def twice(x):\n    return x + x\n", day=3)
    sel = dataclasses.replace(SEL, seed=0)
    sync(buffer, store, sel)
    key = split.task_key(spec)
    if buffer.conn.execute("SELECT split FROM splits WHERE task_key = ?", (key,)).fetchone()[0] != "heldout":
        buffer.conn.execute("UPDATE splits SET split = 'heldout' WHERE task_key = ?", (key,))
        buffer.conn.execute("UPDATE examples SET split = 'heldout' WHERE task_key = ?", (key,))
    rows_of_task = [r for r in snapshot(buffer, sel).heldout if r["task_key"] == key]
    assert len(rows_of_task) == 1
    assert rows_of_task[0]["completion"][0]["content"] == "def twice(x):\n    return 2 * x\n"


def test_choose_holds_out_up_to_the_floor_never_more_than_it_trains():
    held = trained = 0
    for k in range(60):
        side = split.choose(f"task {k}", held, trained, held, trained, fraction=1e-9, min_tasks=24)
        held, trained = held + (side == split.HELDOUT), trained + (side == split.TRAIN)
        assert held <= trained + 1
    assert held == 24 and trained == 36


def test_a_first_store_of_sixty_tasks_holds_out_the_floor_not_a_fraction_of_it(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(60):
        add_task(store, i)
    sync(buffer, store, SelectionSettings(heldout_fraction=0.15, heldout_min_tasks=24))
    sides = [r["split"] for r in rows(buffer).values()]
    assert sides.count(split.HELDOUT) >= 24 and sides.count(split.TRAIN) >= 30
    assert len(snapshot(buffer).heldout) >= 24  # what the gate will score


def test_without_a_floor_the_fraction_alone_decides(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(60):
        add_task(store, i)
    sync(buffer, store, SelectionSettings(heldout_fraction=0.15, heldout_min_tasks=0, heldout_per_family=0))
    held = [r["task_key"] for r in rows(buffer).values() if r["split"] == split.HELDOUT]
    assert held == [k for k in held if split.side(k, 0.15) == split.HELDOUT] and len(held) < 20


def test_a_family_that_arrives_later_is_held_out_and_scored_at_once(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(60):
        add_task(store, i, family="old")
    sel = SelectionSettings(heldout_fraction=0.15, heldout_min_tasks=10, heldout_per_family=3, family_key="family")
    sync(buffer, store, sel)
    for i in range(60, 70):
        add_task(store, i, family="new", day=3)
    sync(buffer, store, sel)
    family = dict(buffer.conn.execute("SELECT task_key, family FROM splits WHERE split = 'heldout'"))
    assert list(family.values()).count("new") >= 3
    # Under a cap smaller than the held-out set, the late family's tasks are still scored.
    capped = snapshot(buffer, sel, max_heldout=8).heldout
    assert len(capped) == 8 and sum(family[r["task_key"]] == "new" for r in capped) == 3


def test_max_heldout_keeps_the_oldest_tasks_as_the_buffer_grows(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(40):
        add_task(store, i, day=0)
    sync(buffer, store)
    first = [r["task_key"] for r in snapshot(buffer, max_heldout=4).heldout]
    assert len(first) == 4
    for i in range(40, 80):
        add_task(store, i, day=5)  # newer tasks, some held out
    sync(buffer, store)
    assert [r["task_key"] for r in snapshot(buffer, max_heldout=4).heldout] == first
    assert len(snapshot(buffer).heldout) > len(snapshot(buffer, max_heldout=len(first) * 2).heldout) >= 8


def test_snapshot_mixes_new_and_replayed_examples_reproducibly(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(60):
        add_task(store, i, retries=1 + i % 4)
    sync(buffer, store)
    mark = buffer.conn.execute("SELECT max(seq) FROM examples").fetchone()[0]
    for i in range(60, 80):
        add_task(store, i, day=1)
    sync(buffer, store)
    new_total = examples.count_new(buffer, mark)
    snap = snapshot(buffer, dataclasses.replace(SEL, seed=7, replay_weighting="retries"), n=40, since_seq=mark)
    assert snap.stats["new"] == min(new_total, 20) and snap.stats["replayed"] == snap.stats["new"]
    new = [s for s in snap.example_seqs if s > mark]
    assert len(new) == snap.stats["new"] and len(set(snap.example_seqs)) == len(snap.example_seqs)
    same = snapshot(buffer, dataclasses.replace(SEL, seed=7, replay_weighting="retries"), n=40, since_seq=mark)
    assert same.example_seqs == snap.example_seqs and same.train == snap.train
    other = snapshot(buffer, dataclasses.replace(SEL, seed=8, replay_weighting="retries"), n=40, since_seq=mark)
    assert other.example_seqs != snap.example_seqs
    heldout = {r["seq"] for r in rows(buffer).values() if r["split"] == "heldout"}
    assert not heldout & set(snap.example_seqs)


def test_snapshot_draws_from_a_large_pool_without_reading_it_whole(buffer):
    """Past SMALL_RANGE the draw probes random seqs; the result is still exact and in the pool."""
    n = 30_000
    with buffer.transaction() as conn:
        conn.executemany(
            "INSERT INTO examples (seq, chain_id, source, workflow_id, action_pair_id, outcome, retries, attempts, "
            "origin, generated_only, created_ts, task_key, answer_key, text_key, chain_key, split, minhash, "
            "updated_at) VALUES (?, ?, 's', 'w', 'g', ?, ?, 2, 'generated', 1, 0, 't', 'a', 'x', 'c', ?, x'', 0)",
            [
                (s, f"c{s}", "refined" if s % 3 else "first_try", s % 5, "heldout" if s % 7 == 0 else "train")
                for s in range(1, n + 1)
            ],
        )
    policy, ctx = examples.policy_and_context(dataclasses.replace(SEL, policy="refinement"))
    where, params = examples._pool_where(policy, ctx, "train", ("first_try", "refined"))
    probe_calls = []

    from lorad.buffer import sampling

    def probe(seqs):
        probe_calls.append(len(seqs))
        return dict(
            buffer.conn.execute(
                f"SELECT seq, retries FROM examples WHERE seq IN (SELECT value FROM json_each(?)) AND {where}",
                (str(seqs), *params),
            )
        )

    import random

    got = sampling.draw(500, 0, n, probe, lambda lo, hi: pytest.fail("scanned"), random.Random(0), "retries")
    assert len(got) == len(set(got)) == 500
    assert all(s % 3 and s % 7 for s in got)  # refined and train only
    assert probe_calls and sum(probe_calls) < n / 4


def test_count_new_uses_the_policy_the_last_refresh_was_given(buffer, fixture_store):
    sync(buffer, fixture_store, SelectionSettings(policy="all_successes"))
    train = [r for r in rows(buffer).values() if r["split"] == "train"]
    assert examples.count_new(buffer, 0) == sum(1 for r in train if r["outcome"] != "exhausted")
    examples.refresh(buffer, SelectionSettings(policy="refinement"))
    assert examples.count_new(buffer, 0) == sum(1 for r in train if r["outcome"] == "refined")
    assert examples.count_new(buffer, 0, SelectionSettings(policy="exhausted")) == sum(
        1 for r in train if r["outcome"] == "exhausted"
    )


def test_when_the_kept_copy_stops_being_an_example_the_older_duplicate_comes_back(buffer, tmp_path):
    store = tmp_path / "store"
    add_task(store, 1)
    add_task(store, 2)
    add_task(store, 1, workflow="dup", day=1)
    sync(buffer, store)
    dropped = [c for c, r in rows(buffer).items() if r["duplicate_of"] is not None]
    assert len(dropped) == 1
    for path in (store / "objects").rglob("*.json"):  # the newer copy loses its specification
        obj = synthetic.json.loads(path.read_text())
        if obj["workflow_id"] == "dup":
            obj["context"]["specification"] = ""
            synthetic.write(store, obj)
    report = sync(buffer, store)
    assert report.removed == 1 and report.skipped == {"empty_specification": 1}
    after = rows(buffer)
    assert len(after) == 2 and dropped[0] in after
    assert after[dropped[0]]["duplicate_of"] is None


def test_a_new_dedup_similarity_rechecks_every_example(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(6):
        add_task(store, i)
    add_task(
        store,
        2,
        workflow="near",
        day=1,
        answer='def f2(x: int) -> int:\n    """Task 2."""\n    return x * 2 + 3  # ok\n',
    )
    sync(buffer, store, SelectionSettings(dedup_similarity=0.99))
    assert examples.totals(buffer.conn)["duplicates"] == 0
    report = examples.refresh(buffer, SelectionSettings(dedup_similarity=0.8))
    assert report.duplicates == {"exact": 0, "near": 1}
    assert examples.refresh(buffer, SelectionSettings(dedup_similarity=0.99)).duplicates == {"exact": 0, "near": 0}
    assert examples.totals(buffer.conn)["duplicates"] == 0


def test_snapshot_system_message_takes_the_configured_template_role(buffer, fixture_store, tmp_path):
    sync(buffer, fixture_store)
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"g_coder": {"role": "You fix code."}}')
    snap = snapshot(buffer, SelectionSettings(prompt_template=f"{prompts}:g_coder"), n=5)
    assert snap.train and snap.heldout  # else the check below holds of nothing
    for r in snap.train + snap.heldout:
        assert r["prompt"][0]["role"] == "system" and r["prompt"][0]["content"].startswith("You fix code.\n\n"), r
    default = snapshot(buffer, n=5)
    assert default.train and not default.train[0]["prompt"][0]["content"].startswith("You fix code.")


def test_snapshot_counts_contaminated_heldout_rows(buffer, tmp_path):
    store = tmp_path / "store"
    for i in range(12):
        add_task(store, i)
    sync(buffer, store)
    assert snapshot(buffer, n=50).stats["contaminated"] == 0
    held = buffer.conn.execute(
        "SELECT task_key FROM examples WHERE split = 'heldout' AND outcome = 'refined' LIMIT 1"
    ).fetchone()
    with buffer.transaction() as conn:
        conn.execute(
            "UPDATE examples SET task_key = ? WHERE chain_id = "
            "(SELECT chain_id FROM examples WHERE split = 'train' LIMIT 1)",
            held,
        )
    assert snapshot(buffer, n=50).stats["contaminated"] == 1


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), min_size=2, max_size=12), cut=st.integers(0, 12))
def test_incremental_dedup_and_split_equal_a_batch_build_of_the_same_chains(tmp_path_factory, picks, cut):
    """Tasks 0-5, each answered in one of 3 ways (two near-identical): grown in two steps or at once."""
    root = tmp_path_factory.mktemp("grow")
    store = root / "store"
    answers = ["return x * {i} + 1\n", "return x * {i} + 1  # ok\n", "return {i} - x\n"]

    def write(k, task, variant):
        add_task(
            store,
            task,
            workflow=f"w{k}",
            day=k,
            answer=f'def f{task}(x: int) -> int:\n    """Task {task}."""\n    ' + answers[variant].format(i=task),
        )

    with Buffer(root / "grown.sqlite3") as grown:
        for k, (task, variant) in enumerate(picks):
            write(k, task, variant)
            if k + 1 == cut:
                sync(grown, store)
        sync(grown, store)
        grown_rows = rows(grown)
    with Buffer(root / "batch.sqlite3") as batch:
        sync(batch, store)
        batch_rows = rows(batch)
    kept = lambda rs: {c for c, r in rs.items() if r["duplicate_of"] is None}  # noqa: E731
    assert kept(grown_rows) == kept(batch_rows)
    assert {c: r["split"] for c, r in grown_rows.items()} == {c: r["split"] for c, r in batch_rows.items()}
    # One kept example per (task, answer family): variants 0 and 1 are near-duplicates.
    families = {(t, v == 2) for t, v in picks}
    assert len(kept(batch_rows)) == len(families)


def test_long_texts_are_cut_when_read_so_memory_does_not_grow_with_their_size(buffer, tmp_path):
    """Four chains with 2 MB answers and specifications (allowed under store.max_file_bytes):
    refresh and snapshot read each text cut to selection.max_text_chars, so what they hold does
    not grow with the texts (MinHash over a whole 2 MB text took ~200 MB alone)."""
    import tracemalloc

    store = tmp_path / "store"
    words = " ".join(f"w{k}" for k in range(300_000))  # ~2 MB
    for i in range(4):
        add_task(store, i, spec=f"Task {i}: {words}", answer=f"def f{i}():\n    return '{words}'\n", retries=1)
    ingest(buffer, [AtomicGuardSource("s", store, settle_seconds=0)])
    sel = dataclasses.replace(SEL, heldout_fraction=0.01, max_text_chars=5000, max_artifact_chars=300)
    tracemalloc.start()
    try:
        examples.refresh(buffer, sel)
        snap = snapshot(buffer, sel)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert snap.train
    for row in snap.train:
        user, answer = row["prompt"][-1]["content"], row["completion"][0]["content"]
        assert len(answer) < 5100 and answer.endswith("more characters cut]")
        assert len(user) < 5000 + 2 * 400 + 500  # the specification and one attempt, each cut


def test_a_refresh_read_in_chunks_equals_one_read_at_once(tmp_path, monkeypatch):
    """Chunks of 3 chains give the same sides (assigned in arrival order over all of them, the
    held-out floor included), seqs and duplicates as one chunk."""
    store = tmp_path / "store"
    for i in range(14):
        add_task(store, i, retries=i % 3, day=13 - i)  # the newest tasks first in the chains table
    add_task(
        store,
        99,
        answer='def f3(x: int) -> int:\n    """Task 3."""\n    return x * 3 + 10\n',
        day=20,
        spec="Write a Python function `f3(x)` that returns x times 3 plus 10.",
        workflow="again",
    )
    sel = dataclasses.replace(SEL, heldout_min_tasks=5)
    built = {}
    for chunk in (1000, 3):
        monkeypatch.setattr(examples, "REFRESH_CHUNK", chunk)
        with Buffer(tmp_path / f"b{chunk}.sqlite3") as b:
            sync(b, store, sel)
            built[chunk] = {c: (r["seq"], r["split"], r["duplicate"]) for c, r in rows(b).items()}
    assert built[3] == built[1000]
    assert sum(side == "heldout" for _, side, _ in built[3].values()) >= 5
