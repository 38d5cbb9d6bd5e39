"""build_prompts, GRPO's training set: first-attempt prompts of training tasks of every decided
outcome; n respected; harder tasks drawn more often under retries weighting; held-out tasks and
duplicates never."""

from __future__ import annotations

import dataclasses

from test_examples import add_task, sync

from lorad.buffer.prompts import build_prompts
from lorad.config import SelectionSettings

SEL = SelectionSettings(heldout_fraction=0.3, heldout_min_tasks=0, heldout_per_family=0, dedup_similarity=0.9)


def spec(i: int) -> str:
    return f"Write a Python function `f{i}(x)` that returns x times {i} plus {i * 7 % 11}."


def examples_by_chain(buffer) -> dict[str, dict]:
    cur = buffer.conn.execute("SELECT chain_id, split, outcome, retries, duplicate_of FROM examples")
    return {r[0]: {"split": r[1], "outcome": r[2], "retries": r[3], "duplicate_of": r[4]} for r in cur}


def store_of_every_outcome(buffer, tmp_path) -> dict[str, dict]:
    """30 tasks: first-try (i % 3 == 0), refined (1) and exhausted (2, never accepted); five of
    them answered again, word for word, a day later (duplicates)."""
    store = tmp_path / "store"
    for i in range(30):
        add_task(store, i, retries=i % 3 and 1 + i % 4, accepted=i % 3 != 2)
    for i in range(0, 30, 6):
        add_task(store, i, retries=0, workflow=f"again-{i}", day=1)
    sync(buffer, store, SEL)
    return examples_by_chain(buffer)


def test_every_train_task_of_every_decided_outcome_gives_its_first_attempt_prompt(buffer, tmp_path):
    table = store_of_every_outcome(buffer, tmp_path)
    train = {c for c, r in table.items() if r["split"] == "train" and r["duplicate_of"] is None}
    held = {c for c, r in table.items() if r["split"] == "heldout"}
    duplicates = {c for c, r in table.items() if r["duplicate_of"] is not None}
    assert held and duplicates and {table[c]["outcome"] for c in train} == {"first_try", "refined", "exhausted"}

    got = build_prompts(buffer, SEL, n=1000)
    chains = [r["chain_id"] for r in got.rows]
    assert sorted(chains) == sorted(train)  # each once; no held-out task, no duplicate
    assert got.stats["pool"] == len(train) and got.stats["prompts"] == len(train)
    assert got.stats["outcomes"] == {
        o: sum(1 for c in train if table[c]["outcome"] == o) for o in ("first_try", "refined", "exhausted")
    }
    specs = {spec(i) for i in range(30)}
    for row in got.rows:
        assert row["specification"] in specs
        assert row["prompt"][-1] == {"role": "user", "content": row["specification"]}  # the first attempt's
        assert not any("Previous attempts" in m["content"] for m in row["prompt"])  # no retry history
        assert row["metadata"]["outcome"] == table[row["chain_id"]]["outcome"]
        assert row["metadata"]["split"] == "train"
    assert got.max_seq == buffer.conn.execute("SELECT max(seq) FROM examples WHERE split = 'train'").fetchone()[0]
    assert len(got.seqs) == len(train)


def test_n_prompts_are_drawn_without_repeats_and_reproducibly(buffer, tmp_path):
    store_of_every_outcome(buffer, tmp_path)
    five = build_prompts(buffer, SEL, n=5)
    assert len(five.rows) == len({r["chain_id"] for r in five.rows}) == 5 == five.stats["prompts"]
    assert len(five.seqs) == 5
    assert [r["chain_id"] for r in build_prompts(buffer, SEL, n=5).rows] == [r["chain_id"] for r in five.rows]
    assert build_prompts(buffer, SEL, n=0).rows == []


def test_retries_weighting_draws_tasks_that_needed_more_retries_more_often(buffer, tmp_path):
    """40 first-try tasks (weight 1) and 40 refined after 4 retries (weight 5): 6 prompts drawn
    under 40 seeds come mostly from the hard half with "retries", about half with "uniform"."""
    store = tmp_path / "store"
    for i in range(80):
        add_task(store, i, retries=0 if i % 2 else 4)
    sync(buffer, store, SEL)
    table = examples_by_chain(buffer)

    def hard_share(weighting: str) -> float:
        picked = [
            r["chain_id"]
            for seed in range(40)
            for r in build_prompts(buffer, dataclasses.replace(SEL, replay_weighting=weighting, seed=seed), n=6).rows
        ]
        assert len(picked) == 240
        return sum(table[c]["retries"] == 4 for c in picked) / len(picked)

    train = [r for r in table.values() if r["split"] == "train"]
    hard_in_pool = sum(r["retries"] == 4 for r in train) / len(train)
    assert 0.35 < hard_in_pool < 0.65
    weighted, uniform = hard_share("retries"), hard_share("uniform")
    assert weighted > 0.7 and abs(uniform - hard_in_pool) < 0.12, (weighted, uniform, hard_in_pool)
