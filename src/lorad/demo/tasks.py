"""Small Python tasks for `lorad demo`: a specification, a correct answer, plausible wrong
attempts, and the tests a guard runs. The demo's store is made by really running the guard
on each attempt, so every verdict and every piece of feedback in it is genuine.

Besides the hand-written tasks there are parametrised families (``add_3``, ``add_7``, ...):
a held-out member of a family is a task the model never saw whose pattern it can learn from
the members it trained on, so first-attempt acceptance has room to move. A task with
``solved = False`` ends exhausted in the store: the generator never got it right, but the
guard can still judge a new first attempt at it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from lorad.loop.tasks import run_tests

CONSTRAINTS = "Return only Python code. Use type hints and a one-line docstring."


@dataclass(frozen=True)
class Task:
    name: str
    specification: str
    solution: str
    wrong: tuple[str, ...]  # attempts the guard rejects, in the order they were "generated"
    tests: tuple[str, ...]  # Python expressions that must be true
    solved: bool = True  # False: the store holds only the wrong attempts (an exhausted chain)


def _fn(signature: str, doc: str, body: str) -> str:
    return f'def {signature}:\n    """{doc}"""\n    {body}\n'


TASKS: tuple[Task, ...] = (
    Task(
        "sum_evens",
        "Write a Python function `sum_evens(xs)` that returns the sum of the even numbers in the list xs.",
        _fn(
            "sum_evens(xs: list[int]) -> int",
            "Return the sum of the even numbers in xs.",
            "return sum(x for x in xs if x % 2 == 0)",
        ),
        (
            _fn(
                "sum_evens(xs: list[int]) -> int",
                "Return the sum of the even numbers in xs.",
                "return sum(x for x in xs if x % 2)",
            ),
        ),
        ("sum_evens([1, 2, 3, 4]) == 6", "sum_evens([]) == 0", "sum_evens([5]) == 0"),
    ),
    Task(
        "is_palindrome",
        "Write a Python function `is_palindrome(s)` that tells whether the string s reads the same backwards, ignoring case.",
        _fn(
            "is_palindrome(s: str) -> bool",
            "Tell whether s is a palindrome, ignoring case.",
            "return s.lower() == s.lower()[::-1]",
        ),
        (
            _fn(
                "is_palindrome(s: str) -> bool", "Tell whether s is a palindrome, ignoring case.", "return s == s[::-1]"
            ),
        ),
        ("is_palindrome('Abba')", "not is_palindrome('abc')", "is_palindrome('')"),
    ),
    Task(
        "count_vowels",
        "Write a Python function `count_vowels(s)` that returns how many vowels (a, e, i, o, u, either case) the string s holds.",
        _fn(
            "count_vowels(s: str) -> int",
            "Return the number of vowels in s.",
            "return sum(1 for c in s.lower() if c in 'aeiou')",
        ),
        (
            _fn(
                "count_vowels(s: str) -> int",
                "Return the number of vowels in s.",
                "return sum(1 for c in s if c in 'aeiou')",
            ),
            _fn(
                "count_vowels(s: str) -> int",
                "Return the number of vowels in s.",
                "return len([c for c in s.lower() if c in 'aeiou'] +)",
            ),
        ),
        ("count_vowels('Hello') == 2", "count_vowels('AEIOU') == 5", "count_vowels('xyz') == 0"),
    ),
    Task(
        "max_of_three",
        "Write a Python function `max_of_three(a, b, c)` that returns the largest of three numbers without using max().",
        _fn(
            "max_of_three(a: float, b: float, c: float) -> float",
            "Return the largest of a, b and c.",
            "largest = a\n    if b > largest:\n        largest = b\n    if c > largest:\n        largest = c\n    return largest",
        ),
        (
            _fn(
                "max_of_three(a: float, b: float, c: float) -> float",
                "Return the largest of a, b and c.",
                "return a if a > b else b",
            ),
        ),
        ("max_of_three(1, 2, 3) == 3", "max_of_three(3, 2, 1) == 3", "max_of_three(-1, -5, -2) == -1"),
    ),
    Task(
        "factorial",
        "Write a Python function `factorial(n)` that returns n! for a non-negative integer n.",
        _fn(
            "factorial(n: int) -> int",
            "Return n factorial.",
            "result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result",
        ),
        (
            _fn(
                "factorial(n: int) -> int",
                "Return n factorial.",
                "result = 1\n    for k in range(2, n):\n        result *= k\n    return result",
            ),
            _fn("factorial(n: int) -> int", "Return n factorial.", "return n * factorial(n - 1)"),
        ),
        ("factorial(0) == 1", "factorial(5) == 120", "factorial(1) == 1"),
    ),
    Task(
        "reverse_words",
        "Write a Python function `reverse_words(s)` that returns the words of s in reverse order, separated by single spaces.",
        _fn(
            "reverse_words(s: str) -> str",
            "Return the words of s in reverse order.",
            "return ' '.join(reversed(s.split()))",
        ),
        (_fn("reverse_words(s: str) -> str", "Return the words of s in reverse order.", "return s[::-1]"),),
        ("reverse_words('a b c') == 'c b a'", "reverse_words('  hi  there ') == 'there hi'", "reverse_words('') == ''"),
    ),
    Task(
        "clamp",
        "Write a Python function `clamp(x, lo, hi)` that limits x to the range [lo, hi].",
        _fn(
            "clamp(x: float, lo: float, hi: float) -> float",
            "Limit x to the range [lo, hi].",
            "return max(lo, min(x, hi))",
        ),
        (
            _fn(
                "clamp(x: float, lo: float, hi: float) -> float",
                "Limit x to the range [lo, hi].",
                "return min(lo, max(x, hi))",
            ),
        ),
        ("clamp(5, 0, 3) == 3", "clamp(-1, 0, 3) == 0", "clamp(2, 0, 3) == 2"),
    ),
    Task(
        "fizzbuzz",
        "Write a Python function `fizzbuzz(n)` that returns 'Fizz' for multiples of 3, 'Buzz' for multiples of 5, 'FizzBuzz' for both, else str(n).",
        _fn(
            "fizzbuzz(n: int) -> str",
            "Return the FizzBuzz word for n.",
            "if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)",
        ),
        (
            _fn(
                "fizzbuzz(n: int) -> str",
                "Return the FizzBuzz word for n.",
                "if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    return str(n)",
            ),
        ),
        ("fizzbuzz(15) == 'FizzBuzz'", "fizzbuzz(9) == 'Fizz'", "fizzbuzz(10) == 'Buzz'", "fizzbuzz(7) == '7'"),
    ),
    Task(
        "unique_sorted",
        "Write a Python function `unique_sorted(xs)` that returns the distinct items of xs in ascending order.",
        _fn(
            "unique_sorted(xs: list[int]) -> list[int]",
            "Return the distinct items of xs in ascending order.",
            "return sorted(set(xs))",
        ),
        (
            _fn(
                "unique_sorted(xs: list[int]) -> list[int]",
                "Return the distinct items of xs in ascending order.",
                "return list(set(xs))",
            ),
            _fn(
                "unique_sorted(xs: list[int]) -> list[int]",
                "Return the distinct items of xs in ascending order.",
                "return sorted(xs)",
            ),
        ),
        (
            "unique_sorted([3, 1, 3, 2]) == [1, 2, 3]",
            "unique_sorted([]) == []",
            "unique_sorted([10, 9, 8, 10, 1]) == [1, 8, 9, 10]",
        ),
    ),
    Task(
        "word_count",
        "Write a Python function `word_count(s)` that returns a dict mapping each lowercase word of s to how often it occurs.",
        _fn(
            "word_count(s: str) -> dict[str, int]",
            "Count how often each lowercase word occurs in s.",
            "counts: dict[str, int] = {}\n    for word in s.lower().split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts",
        ),
        (
            _fn(
                "word_count(s: str) -> dict[str, int]",
                "Count how often each lowercase word occurs in s.",
                "return {w: 1 for w in s.split()}",
            ),
        ),
        ("word_count('a A b') == {'a': 2, 'b': 1}", "word_count('') == {}"),
    ),
    Task(
        "second_largest",
        "Write a Python function `second_largest(xs)` that returns the second largest distinct number in xs, or None if there is none.",
        _fn(
            "second_largest(xs: list[int]) -> int | None",
            "Return the second largest distinct number in xs, or None.",
            "distinct = sorted(set(xs))\n    return distinct[-2] if len(distinct) >= 2 else None",
        ),
        (
            _fn(
                "second_largest(xs: list[int]) -> int | None",
                "Return the second largest distinct number in xs, or None.",
                "return sorted(xs)[-2]",
            ),
            _fn(
                "second_largest(xs: list[int]) -> int | None",
                "Return the second largest distinct number in xs, or None.",
                "distinct = sorted(set(xs))\n    return distinct[-2]",
            ),
        ),
        ("second_largest([1, 3, 3, 2]) == 2", "second_largest([5]) is None", "second_largest([]) is None"),
    ),
    Task(
        "flatten",
        "Write a Python function `flatten(xss)` that flattens a list of lists into one list, keeping the order.",
        _fn(
            "flatten(xss: list[list[int]]) -> list[int]",
            "Flatten a list of lists into one list.",
            "return [x for xs in xss for x in xs]",
        ),
        (
            _fn(
                "flatten(xss: list[list[int]]) -> list[int]",
                "Flatten a list of lists into one list.",
                "return [xs for xs in xss]",
            ),
        ),
        ("flatten([[1, 2], [3], []]) == [1, 2, 3]", "flatten([]) == []"),
    ),
    Task(
        "celsius_to_fahrenheit",
        "Write a Python function `celsius_to_fahrenheit(c)` that converts degrees Celsius to Fahrenheit.",
        _fn(
            "celsius_to_fahrenheit(c: float) -> float",
            "Convert degrees Celsius to Fahrenheit.",
            "return c * 9 / 5 + 32",
        ),
        (
            _fn(
                "celsius_to_fahrenheit(c: float) -> float",
                "Convert degrees Celsius to Fahrenheit.",
                "return (c + 32) * 5 / 9",
            ),
        ),
        ("celsius_to_fahrenheit(0) == 32", "celsius_to_fahrenheit(100) == 212", "celsius_to_fahrenheit(-40) == -40"),
    ),
    Task(
        "is_prime",
        "Write a Python function `is_prime(n)` that tells whether the integer n is a prime number.",
        _fn(
            "is_prime(n: int) -> bool",
            "Tell whether n is prime.",
            "if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n        if n % k == 0:\n            return False\n        k += 1\n    return True",
        ),
        (
            _fn("is_prime(n: int) -> bool", "Tell whether n is prime.", "return all(n % k for k in range(2, n))"),
            _fn("is_prime(n: int) -> bool", "Tell whether n is prime.", "return n % 2 == 1"),
        ),
        ("is_prime(2)", "is_prime(13)", "not is_prime(1)", "not is_prime(9)", "not is_prime(0)"),
    ),
    Task(
        "chunk",
        "Write a Python function `chunk(xs, n)` that splits xs into consecutive lists of length n (the last may be shorter).",
        _fn(
            "chunk(xs: list[int], n: int) -> list[list[int]]",
            "Split xs into consecutive lists of length n.",
            "return [xs[i:i + n] for i in range(0, len(xs), n)]",
        ),
        (
            _fn(
                "chunk(xs: list[int], n: int) -> list[list[int]]",
                "Split xs into consecutive lists of length n.",
                "return [xs[i:i + n] for i in range(0, len(xs) - n, n)]",
            ),
        ),
        ("chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]", "chunk([], 3) == []", "chunk([1, 2], 2) == [[1, 2]]"),
    ),
    Task(
        "capitalize_words",
        "Write a Python function `capitalize_words(s)` that upper-cases the first letter of every word in s and lower-cases the rest.",
        _fn(
            "capitalize_words(s: str) -> str",
            "Capitalize every word in s.",
            "return ' '.join(w.capitalize() for w in s.split(' '))",
        ),
        (_fn("capitalize_words(s: str) -> str", "Capitalize every word in s.", "return s.capitalize()"),),
        ("capitalize_words('hello wORLD') == 'Hello World'", "capitalize_words('a') == 'A'"),
    ),
    Task(
        "running_total",
        "Write a Python function `running_total(xs)` that returns the list of cumulative sums of xs.",
        _fn(
            "running_total(xs: list[int]) -> list[int]",
            "Return the cumulative sums of xs.",
            "out: list[int] = []\n    total = 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out",
        ),
        (
            _fn(
                "running_total(xs: list[int]) -> list[int]",
                "Return the cumulative sums of xs.",
                "return [sum(xs[:i]) for i in range(len(xs))]",
            ),
        ),
        ("running_total([1, 2, 3]) == [1, 3, 6]", "running_total([]) == []"),
    ),
    Task(
        "digits_sum",
        "Write a Python function `digits_sum(n)` that returns the sum of the decimal digits of the integer n (ignore the sign).",
        _fn(
            "digits_sum(n: int) -> int",
            "Return the sum of the decimal digits of n.",
            "return sum(int(d) for d in str(abs(n)))",
        ),
        (
            _fn(
                "digits_sum(n: int) -> int",
                "Return the sum of the decimal digits of n.",
                "return sum(int(d) for d in str(n))",
            ),
        ),
        ("digits_sum(123) == 6", "digits_sum(-45) == 9", "digits_sum(0) == 0"),
    ),
    Task(
        "gcd",
        "Write a Python function `gcd(a, b)` that returns the greatest common divisor of two non-negative integers.",
        _fn(
            "gcd(a: int, b: int) -> int",
            "Return the greatest common divisor of a and b.",
            "while b:\n        a, b = b, a % b\n    return a",
        ),
        (_fn("gcd(a: int, b: int) -> int", "Return the greatest common divisor of a and b.", "return min(a, b)"),),
        ("gcd(12, 18) == 6", "gcd(7, 0) == 7", "gcd(9, 28) == 1"),
    ),
    Task(
        "remove_duplicates",
        "Write a Python function `remove_duplicates(xs)` that removes repeated items from xs, keeping the first occurrence of each in order.",
        _fn(
            "remove_duplicates(xs: list[int]) -> list[int]",
            "Remove repeated items, keeping first occurrences in order.",
            "seen: set[int] = set()\n    out: list[int] = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out",
        ),
        (
            _fn(
                "remove_duplicates(xs: list[int]) -> list[int]",
                "Remove repeated items, keeping first occurrences in order.",
                "return list(set(xs))",
            ),
        ),
        ("remove_duplicates([3, 1, 3, 2, 1]) == [3, 1, 2]", "remove_duplicates([]) == []"),
    ),
    Task(
        "mean",
        "Write a Python function `mean(xs)` that returns the arithmetic mean of xs, or 0.0 for an empty list.",
        _fn(
            "mean(xs: list[float]) -> float",
            "Return the arithmetic mean of xs, 0.0 when empty.",
            "return sum(xs) / len(xs) if xs else 0.0",
        ),
        (
            _fn(
                "mean(xs: list[float]) -> float",
                "Return the arithmetic mean of xs, 0.0 when empty.",
                "return sum(xs) / len(xs)",
            ),
        ),
        ("mean([1, 2, 3]) == 2", "mean([]) == 0.0"),
    ),
    Task(
        "last_n",
        "Write a Python function `last_n(xs, n)` that returns the last n items of xs (all of them if there are fewer).",
        _fn(
            "last_n(xs: list[int], n: int) -> list[int]",
            "Return the last n items of xs.",
            "return xs[-n:] if n > 0 else []",
        ),
        (_fn("last_n(xs: list[int], n: int) -> list[int]", "Return the last n items of xs.", "return xs[-n:]"),),
        ("last_n([1, 2, 3], 2) == [2, 3]", "last_n([1], 5) == [1]", "last_n([1, 2], 0) == []"),
    ),
    Task(
        "count_char",
        "Write a Python function `count_char(s, c)` that returns how many times the character c occurs in s.",
        _fn("count_char(s: str, c: str) -> int", "Return how many times c occurs in s.", "return s.count(c)"),
        (),
        ("count_char('banana', 'a') == 3", "count_char('', 'a') == 0"),
    ),
    Task(
        "square_all",
        "Write a Python function `square_all(xs)` that returns a list with the square of each item of xs.",
        _fn(
            "square_all(xs: list[int]) -> list[int]",
            "Return the square of each item of xs.",
            "return [x * x for x in xs]",
        ),
        (),
        ("square_all([1, 2, 3]) == [1, 4, 9]", "square_all([]) == []"),
    ),
    Task(
        "starts_with_vowel",
        "Write a Python function `starts_with_vowel(s)` that tells whether s starts with a vowel (either case).",
        _fn(
            "starts_with_vowel(s: str) -> bool",
            "Tell whether s starts with a vowel.",
            "return bool(s) and s[0].lower() in 'aeiou'",
        ),
        (_fn("starts_with_vowel(s: str) -> bool", "Tell whether s starts with a vowel.", "return s[0] in 'aeiou'"),),
        ("starts_with_vowel('Apple')", "not starts_with_vowel('pear')", "not starts_with_vowel('')"),
    ),
    Task(
        "product",
        "Write a Python function `product(xs)` that returns the product of the numbers in xs (1 for an empty list).",
        _fn(
            "product(xs: list[int]) -> int",
            "Return the product of the numbers in xs.",
            "result = 1\n    for x in xs:\n        result *= x\n    return result",
        ),
        (
            _fn(
                "product(xs: list[int]) -> int",
                "Return the product of the numbers in xs.",
                "result = 0\n    for x in xs:\n        result *= x\n    return result",
            ),
        ),
        ("product([2, 3, 4]) == 24", "product([]) == 1"),
    ),
)


def _family(
    name: str,
    params: tuple,
    spec: str,
    signature: str,
    doc: str,
    body: str,
    wrong: tuple[str, ...],
    tests: tuple[str, ...],
    unsolved: tuple = (),
    first_try: tuple = (),
) -> tuple[Task, ...]:
    """One task per parameter k: every template is formatted with ``k`` (and ``k2`` = 2 * k).

    Members in ``unsolved`` never get their answer (exhausted chains); members in
    ``first_try`` are answered right at once (no wrong attempts)."""
    out = []
    for k in params:
        f = {"k": k, "k2": 2 * k}
        fn = name.format(**f)
        sig = signature.format(fn=fn, **f)
        out.append(
            Task(
                fn,
                spec.format(fn=fn, **f),
                _fn(sig, doc.format(**f), body.format(**f)),
                tuple(_fn(sig, doc.format(**f), w.format(**f)) for w in wrong if k not in first_try),
                tuple(t.format(fn=fn, **f) for t in tests),
                solved=k not in unsolved,
            )
        )
    return tuple(out)


# Each family's templates (see _family); FAMILIES instantiates them at the store demo's
# parameters, loop_rounds at fresh ones.
TEMPLATES: dict[str, tuple] = {
    "add": (
        "add_{k}",
        "Write a Python function `{fn}(x)` that returns x plus {k}.",
        "{fn}(x: int) -> int",
        "Return x plus {k}.",
        "return x + {k}",
        ("return x - {k}", "return x + {k} +"),
        ("{fn}(0) == {k}", "{fn}(10) == 10 + {k}", "{fn}(-{k}) == 0"),
    ),
    "times": (
        "times_{k}",
        "Write a Python function `{fn}(x)` that returns x multiplied by {k}.",
        "{fn}(x: int) -> int",
        "Return x multiplied by {k}.",
        "return x * {k}",
        ("return x ** {k}",),
        ("{fn}(0) == 0", "{fn}(2) == {k2}", "{fn}(-1) == -{k}"),
    ),
    "multiples_of": (
        "multiples_of_{k}",
        "Write a Python function `{fn}(xs)` that returns the items of the list xs divisible by {k}, in order.",
        "{fn}(xs: list[int]) -> list[int]",
        "Return the items of xs divisible by {k}.",
        "return [x for x in xs if x % {k} == 0]",
        ("return [x for x in xs if x % {k}]", "return [x for x in xs if x / {k} == 0]"),
        ("{fn}([{k}, 1, {k2}]) == [{k}, {k2}]", "{fn}([]) == []", "{fn}([1]) == []"),
    ),
    "repeat": (
        "repeat_{k}",
        "Write a Python function `{fn}(s)` that returns the string s repeated {k} times.",
        "{fn}(s: str) -> str",
        "Return s repeated {k} times.",
        "return s * {k}",
        ("return s * {k} + s",),
        ("{fn}('ab') == 'ab' * {k}", "{fn}('') == ''"),
    ),
    "count_above": (
        "count_above_{k}",
        "Write a Python function `{fn}(xs)` that returns how many numbers in xs are greater than {k}.",
        "{fn}(xs: list[int]) -> int",
        "Return how many numbers in xs are greater than {k}.",
        "return sum(1 for x in xs if x > {k})",
        ("return sum(1 for x in xs if x >= {k})", "return len(xs)"),
        ("{fn}([{k}, {k} + 1, {k} - 1]) == 1", "{fn}([]) == 0", "{fn}([{k} + 2, {k} + 3]) == 2"),
    ),
}


def _of(family: str, params: tuple, **kw) -> tuple[Task, ...]:
    name, *rest = TEMPLATES[family]
    return _family(name, params, *rest, **kw)


FAMILIES: tuple[Task, ...] = (
    _of("add", (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 19), unsolved=(11, 13))
    + _of("times", (3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15), first_try=(6,))
    + _of("multiples_of", (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12), unsolved=(10,), first_try=(3,))
    + _of("repeat", (2, 3, 4, 5, 6, 7, 8, 9, 10), first_try=(4,))
    + _of("count_above", (0, 1, 2, 3, 5, 10, 20, 25, 50, 100), unsolved=(5,))
)

# The loop demo's traffic: families SmolLM2 gets right only part of the time when asked as
# atomicguard asks (greedy, this CPU: multiples_of 0/11, count_above 5/10, repeat 8/9).
LOOP_FAMILIES = ("multiples_of", "count_above", "repeat")

ALL_TASKS: tuple[Task, ...] = TASKS + FAMILIES


def loop_rounds(rounds: int, per_round: int, families: tuple[str, ...] = LOOP_FAMILIES, seed: int = 0) -> list:
    """The loop demo's rounds of new tasks (lorad.loop Tasks): parameters the store demo does not
    use, none twice, the families interleaved."""
    import random

    from lorad.loop.tasks import Task as LoopTask

    rng = random.Random(seed)
    taken = {t.name for t in ALL_TASKS}
    pools = {f: [t for t in _of(f, tuple(range(2, 200))) if t.name not in taken] for f in families}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for k in range(rounds):
        tasks = [
            pools[f][k * per_round // len(families) + i] for i in range(per_round // len(families)) for f in families
        ]
        out.append(
            [
                LoopTask(t.name, f, t.specification, t.name, tests=t.tests, solution=t.solution)
                for t, f in zip(tasks, [f for _ in range(per_round // len(families)) for f in families], strict=True)
            ]
        )
    return out


def check(content: str, task: Task, timeout_s: float = 30.0) -> tuple[bool, str]:
    """Run a task's tests on an answer in a fresh interpreter: (accepted, feedback)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "lorad.demo.tasks", "--run-tests", task.name],
        input=content,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    return proc.returncode == 0, (proc.stdout.strip() or proc.stderr.strip())[-500:]


def _run_tests(name: str, content: str) -> int:
    task = next(t for t in ALL_TASKS if t.name == name)
    failures = run_tests(content, task.tests)
    print("; ".join(failures) if failures else "All tests passed")
    return 1 if failures else 0


def guard_main() -> int:
    """The demo's guard command: the answer on stdin, the task found by its specification."""
    spec = os.environ.get("LORAD_SPECIFICATION", "")
    task = next((t for t in ALL_TASKS if t.specification == spec), None)
    if task is None:
        print(f"no task with this specification: {spec[:80]!r}")
        return 2
    return _run_tests(task.name, _strip_fences(sys.stdin.read()))


def _strip_fences(text: str) -> str:
    """Models often wrap code in ``` fences: the guard judges the code inside."""
    if "```" not in text:
        return text
    inside = text.split("```")[1]
    return inside.split("\n", 1)[1] if inside.startswith(("python", "py\n")) else inside


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run-tests":
        sys.exit(_run_tests(sys.argv[2], sys.stdin.read()))
    if len(sys.argv) == 2 and sys.argv[1] == "--guard":
        sys.exit(guard_main())
    print(json.dumps([t.name for t in ALL_TASKS]))
