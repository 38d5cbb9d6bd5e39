"""The learning benchmark: its task families, its store, and a --quick run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import learning  # noqa: E402
import learning_tasks  # noqa: E402


def test_at_least_200_tasks_whose_answers_pass_and_whose_wrong_attempts_fail():
    tasks = learning_tasks.all_tasks()
    assert len(tasks) >= 200 and len({t.specification for t in tasks}) == len(tasks)
    for task in tasks:
        assert learning_tasks.judge(task, task.solution) == (True, "All tests passed"), task.name
        kinds = []
        for kind, code in task.wrong:
            ok, feedback = learning_tasks.judge(task, code)
            assert not ok and feedback, (task.name, kind)
            kinds.append(kind)
        assert kinds == ["syntax", "name", "result", "prose"]


def test_feedback_says_what_went_wrong():
    task = learning_tasks.make_task(learning_tasks.FAMILIES[0], 7)  # add_7
    verdicts = {kind: learning_tasks.judge(task, code)[1] for kind, code in task.wrong}
    assert verdicts["syntax"].startswith("SyntaxError") and verdicts["prose"].startswith("SyntaxError")
    assert verdicts["name"] == "NameError: no function named add_7"
    assert verdicts["result"].startswith("failed: add_7(-3) == 4")


def test_unseen_tasks_never_reach_the_store(tmp_path):
    store, unseen = learning_tasks.split_tasks(learning_tasks.all_tasks(), unseen_per_family=4, seed=0)
    assert len(unseen) >= 40 and not {t.specification for t in store} & {t.specification for t in unseen}
    counts = learning.write_store(tmp_path / "store", store, seed=0)
    assert counts["tasks"] == len(store) and min(counts["first_try"], counts["refined"], counts["exhausted"]) > 0
    specs = set()
    for path in (tmp_path / "store" / "objects").rglob("*.json"):
        specs.add(json.loads(path.read_text())["context"]["specification"])
    assert specs == {t.specification for t in store}


def test_wilson_interval_matches_hand_computed_values():
    assert learning.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert learning.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_guard_command_judges_by_the_specification():
    task = learning_tasks.all_tasks()[0]

    def run(code):
        return subprocess.run(
            learning.guard_command(),
            input=code,
            capture_output=True,
            text=True,
            env={"LORAD_SPECIFICATION": task.specification, "PATH": ""},
        )

    assert run(task.solution).returncode == 0
    wrong = run(task.wrong[2][1])
    assert wrong.returncode == 1 and "failed" in wrong.stdout


def test_quick_run_prints_one_table_of_five_models(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "learning.py"), "--quick", "--out", str(tmp_path / "work"), "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(report["scores"]) == ["base", "plain trl SFT", "lorad SFT", "lorad GRPO", "lorad SFT+GRPO"]
    n = report["stages"]["unseen_tasks"]
    for s in report["scores"].values():
        assert s["n"] == n and s["ci95"][0] <= s["epsilon"] <= s["ci95"][1]
    assert report["stages"]["lorad_grpo"]["steps"] == 2 and report["stages"]["lorad_sft"]["steps"] == 3
    assert [(p["method"], p["steps"]) for p in report["stages"]["lorad_sft_grpo"]["phases"]] == [
        ("sft", 3),
        ("grpo", 2),
    ]
    assert "| lorad GRPO |" in proc.stdout and "| lorad SFT+GRPO |" in proc.stdout and "target >= 0.85" in proc.stdout


def test_the_store_written_twice_with_one_seed_is_the_same_store(tmp_path):
    """Same ids, so the same files in the same order: lorad's and the plain recipe's data come
    in the same order run after run (with random ids two runs of one plan differed by up to 5 points)."""
    tasks = learning_tasks.all_tasks(learning_tasks.FAMILIES[:2])

    def written(root):
        learning.write_store(root, tasks, seed=3)
        return sorted(p.relative_to(root) for p in root.rglob("*.json"))

    assert written(tmp_path / "a") == written(tmp_path / "b")
    assert written(tmp_path / "c") != [] and learning.accepted_rows(tmp_path / "a") == learning.accepted_rows(
        tmp_path / "c"
    )
