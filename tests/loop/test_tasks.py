"""The closed loop's tasks and guard: tests run in a fresh interpreter, with limits."""

from __future__ import annotations

import os
import subprocess
import sys

from lorad.loop.tasks import Task, judge, write_tasks

ADD = Task(
    "add_3",
    "add",
    "Write a Python function `add_3(x)` that returns x plus 3.",
    "add_3",
    tests=("add_3(0) == 3", "add_3(-3) == 0"),
    solution="def add_3(x):\n    return x + 3\n",
)
CHECKED = Task(
    "HumanEval_x",
    "humaneval",
    "Complete `below(xs, t)`.",
    "below",
    check="def check(candidate):\n    assert candidate([1, 2], 3)\n    assert not candidate([1, 20], 3)\n",
    preamble="from typing import List\n",
    solution="def below(xs: List[int], t: int) -> bool:\n    return all(x < t for x in xs)\n",
)


def test_a_right_answer_passes_and_a_wrong_one_says_which_test_failed():
    assert judge(ADD, ADD.solution) == (True, "All tests passed")
    ok, feedback = judge(ADD, "def add_3(x):\n    return x - 3\n")
    assert not ok and "failed: add_3(0) == 3" in feedback


def test_a_check_program_names_the_failing_assert_and_the_preamble_supplies_imports():
    assert judge(CHECKED, CHECKED.solution)[0]
    ok, feedback = judge(CHECKED, "def below(xs: List[int], t: int) -> bool:\n    return True\n")
    assert not ok and feedback == "failed: assert not candidate([1, 20], 3)"
    ok, feedback = judge(CHECKED, "def other():\n    pass\n")
    assert not ok and "no function named below" in feedback


def test_an_endless_or_greedy_answer_is_a_rejection_not_a_hang():
    ok, feedback = judge(ADD, "def add_3(x):\n    while True:\n        pass\n", timeout=2)
    assert not ok and "timed out" in feedback
    ok, feedback = judge(ADD, "big = bytearray(4 << 30)\n")
    assert not ok and "MemoryError" in feedback


def test_guard_command_finds_the_task_by_its_specification(tmp_path):
    path = write_tasks(tmp_path / "tasks.json", [ADD, CHECKED])
    run = lambda spec, code: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lorad.loop.tasks", "--guard", str(path)],
        input=code,
        capture_output=True,
        text=True,
        env=dict(os.environ, LORAD_SPECIFICATION=spec),
    )
    assert run(CHECKED.specification, CHECKED.solution).returncode == 0
    wrong = run(ADD.specification, "def add_3(x):\n    return x\n")
    assert wrong.returncode == 1 and "failed" in wrong.stdout
    assert run("no such task", "x = 1\n").returncode == 2
