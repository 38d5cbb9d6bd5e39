"""`lorad demo`'s store and config: enough held-out tasks of every outcome for ε to move."""

from __future__ import annotations

from collections import Counter

from lorad import config, demo
from lorad.buffer import examples, split
from lorad.buffer.store import Buffer
from lorad.demo import tasks as demo_tasks
from lorad.sources.atomicguard import AtomicGuardSource
from lorad.sources.ingest import ingest


def test_demo_tasks_answers_pass_their_tests_and_wrong_attempts_fail():
    names = [t.name for t in demo_tasks.ALL_TASKS]
    assert len(names) == len(set(names)) and len({t.specification for t in demo_tasks.ALL_TASKS}) == len(names)
    for task in demo_tasks.ALL_TASKS:
        assert demo_tasks.check(task.solution, task) == (True, "All tests passed"), task.name
        for wrong in task.wrong:
            ok, feedback = demo_tasks.check(wrong, task)
            assert not ok and feedback, (task.name, wrong)


def test_demo_store_holds_at_least_16_heldout_tasks_of_every_outcome(tmp_path):
    counts = demo.write_store(tmp_path / "store")
    cfg_path = demo.write_config(tmp_path, "unused-model", tiny=True)
    settings = config.load(cfg_path)  # the demo's config is valid as written
    assert counts["tasks"] == len(demo_tasks.ALL_TASKS)
    assert counts["first_try"] and counts["refined"] and counts["exhausted"]
    with Buffer(tmp_path / "buffer.sqlite3") as buffer:
        ingest(buffer, [AtomicGuardSource("demo", tmp_path / "store", settle_seconds=0)])
        examples.refresh(buffer, settings.selection)
        snap = examples.build_snapshot(
            buffer,
            settings.selection,
            method="sft",
            n=100,
            replay_ratio=0.5,
            max_heldout=settings.evaluation.max_heldout,
        )
        sides = dict(buffer.conn.execute("SELECT task_key, split FROM splits"))
    assert len(snap.heldout) >= 16
    outcomes = Counter(r["metadata"]["outcome"] for r in snap.heldout)
    assert set(outcomes) == {"first_try", "refined", "exhausted"}, outcomes
    by_spec = {t.specification: t for t in demo_tasks.ALL_TASKS}
    for row in snap.heldout:
        assert sides[row["task_key"]] == split.HELDOUT
        assert row["specification"] in by_spec  # the demo's guard finds the task by it
    assert snap.train and all(
        r["metadata"]["task_key"] not in {h["task_key"] for h in snap.heldout} for r in snap.train
    )


def test_loop_demo_rounds_are_new_tasks_of_its_families_and_its_config_is_valid(tmp_path):
    from lorad.loop import agent
    from lorad.loop.tasks import judge

    rounds = demo_tasks.loop_rounds(demo.ROUNDS, demo.TASKS_PER_ROUND)
    names = [t.name for r in rounds for t in r]
    assert [len(r) for r in rounds] == [demo.TASKS_PER_ROUND] * demo.ROUNDS and len(set(names)) == len(names)
    assert not set(names) & {t.name for t in demo_tasks.ALL_TASKS}  # never a task of the store demo
    assert all(
        Counter(t.family for t in r) == Counter({f: demo.TASKS_PER_ROUND // 3 for f in demo_tasks.LOOP_FAMILIES})
        for r in rounds
    )
    assert all(judge(t, t.solution)[0] for t in rounds[0][:3])
    agent.write_prompts(tmp_path / "prompts.json")
    settings = config.load(demo.write_loop_config(tmp_path, "/models/base.gguf", "http://127.0.0.1:8000"))
    assert settings.selection.prompt_format == "atomicguard" and settings.publish[0].kind == "vllm"
    assert settings.training.max_steps == demo.LOOP_STEPS
