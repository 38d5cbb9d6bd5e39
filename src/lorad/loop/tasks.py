"""A task of the closed loop and its guard: run the answer's tests in a fresh interpreter.

A task is a specification and what judges an answer to it: Python expressions that must be
true (the templated families), or a program defining ``check(candidate)`` as HumanEval ships
it. The answer runs in a subprocess with a time limit and a memory cap, so an answer that
loops or allocates without end is a rejected attempt, never a hung benchmark. The feedback
is what a guard would say: the syntax error, the missing function, the failed test.

``python -m lorad.loop.tasks --guard TASKS.json`` is the same guard as a lorad
``evaluation.guard_command``: the answer on stdin, the task found by its specification in
``$LORAD_SPECIFICATION`` among those TASKS.json lists (:func:`write_tasks`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

# Seconds an answer's tests may run, and the address space they may use.
TIMEOUT_S = 10.0
MEMORY_BYTES = 1 << 30
FEEDBACK_CHARS = 600


@dataclass(frozen=True)
class Task:
    """One task: what is asked, and how an answer is judged.

    ``tests``: Python expressions that must be true; ``check``: a program defining
    ``check(candidate)`` (HumanEval's form), called with the answer's ``entry_point``;
    ``preamble``: code run before the answer (HumanEval's imports); ``solution``: a correct
    answer a person wrote, when one is known.
    """

    name: str
    family: str
    specification: str
    entry_point: str
    tests: tuple[str, ...] = ()
    check: str = ""
    preamble: str = ""
    solution: str = ""


def judge(task: Task, code: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """Run ``task``'s tests on ``code`` in a fresh interpreter: (accepted, feedback)."""
    payload = json.dumps({"task": asdict(task), "code": code})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "lorad.loop.tasks", "--run"],
            input=payload,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s (an endless loop?)"
    feedback = proc.stdout.strip() or proc.stderr.strip()[-FEEDBACK_CHARS:] or f"exit {proc.returncode}"
    return proc.returncode == 0, feedback[:FEEDBACK_CHARS]


def run_tests(code: str, tests, function: str | None = None) -> list[str]:
    """What fails when ``tests`` (Python expressions) are evaluated against ``code``, loaded in a
    fresh scope of this process: [] when every test passes. With ``function``, an answer that
    does not define it fails for that alone. (The demo's guard and bench/learning_tasks.py
    judge their tasks with this too.)"""
    scope: dict = {}
    try:
        exec(compile(code, "<answer>", "exec"), scope)  # noqa: S102 - the guard's whole job
    except SyntaxError as e:
        return [f"SyntaxError: {e.msg} (line {e.lineno})"]
    except Exception as e:  # noqa: BLE001
        return [f"{type(e).__name__} while loading the answer: {e}"]
    if function is not None and not callable(scope.get(function)):
        return [f"NameError: no function named {function}"]
    failures = []
    for test in tests:
        try:
            if not eval(test, scope):  # noqa: S307
                failures.append(f"failed: {test}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{type(e).__name__} in {test}: {e}")
    return failures


def failures(task: Task, code: str) -> list[str]:
    """What fails when ``code`` answers ``task``, in this process: [] when it is accepted."""
    if task.tests:
        return run_tests(task.preamble + code, task.tests, function=task.entry_point)
    loaded = run_tests(task.preamble + code, (), function=task.entry_point)
    if loaded:
        return loaded
    scope: dict = {}
    exec(compile(task.preamble + code, "<answer>", "exec"), scope)  # noqa: S102 - the guard's job
    checks: dict = {}
    try:
        exec(compile(task.check, "<tests>", "exec"), checks)  # noqa: S102
        checks["check"](scope[task.entry_point])
    except Exception as e:  # noqa: BLE001 - every failure is feedback
        return [_where(e, task.check)]
    return []


def _where(error: Exception, program: str) -> str:
    """The failed test's own line, when the failure happened in the tests' program."""
    lines = program.splitlines()
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == "<tests>" and frame.lineno and frame.lineno <= len(lines):
            line = lines[frame.lineno - 1].strip()
            what = type(error).__name__ + (f": {error}" if str(error) else "")
            return f"failed: {line}" if isinstance(error, AssertionError) and not str(error) else f"{what} in: {line}"
    return f"{type(error).__name__}: {error}"


def write_tasks(path: Path, tasks) -> Path:
    """Write ``tasks`` where :func:`guard_main` finds them (one JSON list)."""
    Path(path).write_text(json.dumps([asdict(t) for t in tasks]) + "\n")
    return Path(path)


def read_tasks(path: Path) -> list[Task]:
    return [Task(**{**d, "tests": tuple(d.get("tests", ()))}) for d in json.loads(Path(path).read_text())]


def _run() -> int:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    payload = json.loads(sys.stdin.read())
    task = Task(**{**payload["task"], "tests": tuple(payload["task"]["tests"])})
    found = failures(task, payload["code"])
    print("; ".join(found[:3]) if found else "All tests passed")
    return 1 if found else 0


def guard_main(tasks_file: str) -> int:
    """The guard command: the answer on stdin, the task named by ``$LORAD_SPECIFICATION``."""
    spec = os.environ.get("LORAD_SPECIFICATION", "")
    task = next((t for t in read_tasks(Path(tasks_file)) if t.specification == spec), None)
    if task is None:
        print(f"no task with this specification: {spec[:80]!r}")
        return 2
    ok, feedback = judge(task, sys.stdin.read())
    print(feedback)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--run"]:
        sys.exit(_run())
    if len(sys.argv) == 3 and sys.argv[1] == "--guard":
        sys.exit(guard_main(sys.argv[2]))
    sys.exit("usage: python -m lorad.loop.tasks --guard TASKS.json  (the answer on stdin)")
