"""The learning benchmark's tasks: parametrised families of small Python functions with tests.

Each family is one kind of function (add N, keep the first N items, count a letter, ...); its
parameter makes each task distinct (``add_7`` and ``add_12`` are two tasks with their own
tests). A task carries a specification, the correct answer, and wrong attempts of the kinds
a small model really makes: a syntax slip, a wrong function name, a wrong result, and prose
around the code. :func:`judge` runs a task's tests on an answer (the guard's verdict and
feedback); ``python bench/learning_tasks.py --guard`` is the same as a guard command (the
answer on stdin, the task found by its specification in $LORAD_SPECIFICATION).

    from learning_tasks import all_tasks, split_tasks
    store, unseen = split_tasks(all_tasks(), unseen_per_family=4, seed=0)
"""

from __future__ import annotations

import os
import random
import string
import sys
from dataclasses import dataclass

CONSTRAINTS = "Return only Python code: one function, no explanation."


@dataclass(frozen=True)
class Task:
    family: str
    name: str
    specification: str
    solution: str
    wrong: tuple[tuple[str, str], ...]  # (kind, code): syntax, name, result, prose
    tests: tuple[str, ...]  # Python expressions that must be true


@dataclass(frozen=True)
class Family:
    key: str
    params: tuple
    name: str  # function name template ({p})
    args: str
    spec: str  # what the function does ({p})
    body: str  # the correct body ({p})
    wrong_body: str  # a plausible wrong result ({p})
    tests: object  # p -> [(args text, expected value)]


def _q(c: str) -> str:
    return repr(c)


FAMILIES: tuple[Family, ...] = (
    Family(
        "add",
        tuple(range(2, 26)),
        "add_{p}",
        "x",
        "returns x plus {p}",
        "return x + {p}",
        "return x + {p} + 1",
        lambda p: [("-3", -3 + p), ("0", p), ("11", 11 + p)],
    ),
    Family(
        "times",
        tuple(range(2, 26)),
        "times_{p}",
        "x",
        "returns x multiplied by {p}",
        "return x * {p}",
        "return x + {p}",
        lambda p: [("-3", -3 * p), ("0", 0), ("11", 11 * p)],
    ),
    Family(
        "minus",
        tuple(range(2, 26)),
        "minus_{p}",
        "x",
        "returns x minus {p}",
        "return x - {p}",
        "return {p} - x",
        lambda p: [("-3", -3 - p), ("0", -p), ("40", 40 - p)],
    ),
    Family(
        "sum_first",
        tuple(range(2, 22)),
        "sum_first_{p}",
        "xs",
        "returns the sum of the first {p} items of the list xs",
        "return sum(xs[:{p}])",
        "return sum(xs[:{p} - 1])",
        lambda p: [("[]", 0), ("[1, 2, 3]", sum([1, 2, 3][:p])), ("list(range(100))", sum(range(p)))],
    ),
    Family(
        "first",
        tuple(range(2, 22)),
        "first_{p}",
        "xs",
        "returns the first {p} items of the list xs",
        "return xs[:{p}]",
        "return xs[{p}:]",
        lambda p: [("[]", []), ("list(range(40))", list(range(p)))],
    ),
    Family(
        "last",
        tuple(range(2, 22)),
        "last_{p}",
        "xs",
        "returns the last {p} items of the list xs",
        "return xs[-{p}:]",
        "return xs[{p}:]",
        lambda p: [("list(range(40))", list(range(40 - p, 40))), ("[7]", [7])],
    ),
    Family(
        "clamp",
        tuple(range(3, 25)),
        "clamp_{p}",
        "x",
        "limits x to the range 0 to {p}",
        "return max(0, min(x, {p}))",
        "return min(0, max(x, {p}))",
        lambda p: [("-5", 0), ("2", 2), (str(p + 1), p), ("10 ** 6", p)],
    ),
    Family(
        "repeat",
        tuple(range(2, 20)),
        "repeat_{p}",
        "s",
        "returns the string s repeated {p} times",
        "return s * {p}",
        "return s * ({p} - 1)",
        lambda p: [("''", ""), ("'ab'", "ab" * p)],
    ),
    Family(
        "multiple",
        tuple(range(2, 26)),
        "is_multiple_of_{p}",
        "x",
        "returns True when x is divisible by {p}, else False",
        "return x % {p} == 0",
        "return x % {p} == 1",
        lambda p: [("0", True), (str(3 * p), True), (str(p + 1), False)],
    ),
    Family(
        "mod",
        tuple(range(2, 26)),
        "mod_{p}",
        "x",
        "returns the remainder of x divided by {p}",
        "return x % {p}",
        "return x // {p}",
        lambda p: [("0", 0), (str(5 * p + 1), 1), ("100", 100 % p)],
    ),
    Family(
        "power",
        tuple(range(2, 8)),
        "power_{p}",
        "x",
        "returns x raised to the power {p}",
        "return x ** {p}",
        "return x * {p}",
        lambda p: [("0", 0), ("3", 3**p), ("-2", (-2) ** p)],
    ),
    Family(
        "count",
        tuple(string.ascii_lowercase[:20]),
        "count_{p}",
        "s",
        "returns how many times the character '{p}' occurs in the string s",
        "return s.count('{p}')",
        "return s.count('{p}'.upper())",
        lambda p: [("''", 0), (_q(p), 1), (_q(f"x{p}{p}y{p}"), 3), (_q(p.upper()), 0)],
    ),
    Family(
        "starts",
        tuple(string.ascii_lowercase[:20]),
        "starts_with_{p}",
        "s",
        "returns True when the string s starts with the character '{p}', else False",
        "return s.startswith('{p}')",
        "return '{p}' in s",
        lambda p: [(_q(f"{p}zz"), True), (_q(f"z{p}"), False), ("''", False)],
    ),
    Family(
        "above",
        tuple(range(0, 20)),
        "above_{p}",
        "xs",
        "returns the items of the list xs that are greater than {p}, in order",
        "return [x for x in xs if x > {p}]",
        "return [x for x in xs if x >= {p}]",
        lambda p: [("[]", []), (f"[{p}, {p + 1}, {p - 1}, {p + 5}]", [p + 1, p + 5])],
    ),
)


def _function(name: str, args: str, body: str, colon: bool = True) -> str:
    return f"def {name}({args}){':' if colon else ''}\n    {body}\n"


def make_task(family: Family, p) -> Task:
    name = family.name.format(p=p)
    body = family.body.format(p=p)
    spec = f"Write a Python function `{name}({family.args})` that {family.spec.format(p=p)}."
    solution = _function(name, family.args, body)
    wrong = (
        ("syntax", _function(name, family.args, body, colon=False)),
        ("name", _function(name.replace("_", ""), family.args, body)),
        ("result", _function(name, family.args, family.wrong_body.format(p=p))),
        ("prose", f"Here is the function you asked for:\n\n{solution}\nIt {family.spec.format(p=p)}.\n"),
    )
    tests = tuple(f"{name}({a}) == {v!r}" for a, v in family.tests(p))
    return Task(family.key, name, spec, solution, wrong, tests)


def all_tasks(families: tuple[Family, ...] = FAMILIES) -> list[Task]:
    return [make_task(f, p) for f in families for p in f.params]


def split_tasks(tasks: list[Task], unseen_per_family: int, seed: int = 0) -> tuple[list[Task], list[Task]]:
    """(store tasks, unseen tasks): ``unseen_per_family`` of each family's parameters, drawn
    at random, never go into the store."""
    rng = random.Random(seed)
    by_family: dict[str, list[Task]] = {}
    for t in tasks:
        by_family.setdefault(t.family, []).append(t)
    store, unseen = [], []
    for members in by_family.values():
        held = set(rng.sample(range(len(members)), min(unseen_per_family, len(members))))
        for i, t in enumerate(members):
            (unseen if i in held else store).append(t)
    return store, unseen


def judge(task: Task, code: str) -> tuple[bool, str]:
    """Run the task's tests on ``code`` in this process: (accepted, feedback)."""
    from lorad.loop.tasks import run_tests

    failures = run_tests(code, task.tests, function=task.name)
    return (False, "; ".join(failures[:3])) if failures else (True, "All tests passed")


def guard_main() -> int:
    spec = os.environ.get("LORAD_SPECIFICATION", "")
    task = next((t for t in all_tasks() if t.specification == spec), None)
    if task is None:
        print(f"no task with this specification: {spec[:80]!r}")
        return 2
    ok, feedback = judge(task, sys.stdin.read())
    print(feedback)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--guard"]:
        sys.exit(guard_main())
    tasks = all_tasks()
    print(f"{len(tasks)} tasks in {len(FAMILIES)} families")
