"""Duplicate examples: exact by normalised hash, near by MinHash + LSH; the newest is kept."""

from __future__ import annotations

import random

from lorad.buffer.dedup import Item, dedup, exact_key, lsh_params, signature, similarity

BASE = (
    "Write a Python function `parse_duration(text)` that turns strings like '1h30m' or '45s' into a number "
    "of seconds, raising ValueError on anything else.\n\n"
    "def parse_duration(text: str) -> int:\n    units = {'h': 3600, 'm': 60, 's': 1}\n    total = 0\n"
    "    number = ''\n    for ch in text:\n        if ch.isdigit():\n            number += ch\n"
    "        elif ch in units and number:\n            total += int(number) * units[ch]\n            number = ''\n"
    "        else:\n            raise ValueError(text)\n    if number:\n        raise ValueError(text)\n"
    "    return total\n"
)


def test_exact_duplicates_differ_only_in_whitespace():
    assert exact_key("def f():\n    return 1\n") == exact_key("def f():  \n\treturn 1")
    assert exact_key("def f(): return 1") != exact_key("def f(): return 2")
    assert exact_key("same", "refined") != exact_key("same", "exhausted")


def test_near_duplicates_score_high_and_unrelated_texts_low():
    near = BASE.replace("total = 0", "total = 0  # seconds")
    other = "Write reverse(s) that returns s reversed.\n\ndef reverse(s):\n    return s[::-1]\n"
    assert similarity(signature(BASE), signature(near)) >= 0.8
    assert similarity(signature(BASE), signature(other)) < 0.2


def test_keeps_the_most_recent_of_each_group_and_counts_what_it_dropped():
    copy = "  " + BASE.replace("\n", "\n ")
    result = dedup([Item("old", BASE, (1,)), Item("copy", copy, (2,)), Item("other", "def g(): return 42", (0,))], 0.9)
    assert sorted(result.kept) == ["copy", "other"]
    assert result.dropped == {"old": ("copy", "exact")} and (result.exact, result.near) == (1, 0)

    near = BASE.replace("total = 0", "total = 0  # seconds")
    result = dedup([Item("old", BASE, (1,)), Item("new", near, (5,))], 0.8)
    assert result.kept == ["new"] and result.dropped == {"old": ("new", "near")}
    assert dedup([Item("old", BASE, (1,)), Item("new", near, (5,))], 0.99).kept == ["new", "old"]


def test_result_does_not_depend_on_input_order():
    rng = random.Random(3)
    texts = [BASE.replace("total", f"total{i % 3}") for i in range(12)] + [f"def f{i}(): return {i}" for i in range(12)]
    items = [Item(i, t, (i,)) for i, t in enumerate(texts)]
    first = dedup(items, 0.9)
    shuffled = items[:]
    rng.shuffle(shuffled)
    again = dedup(shuffled, 0.9)
    assert sorted(first.kept) == sorted(again.kept) and first.dropped == again.dropped


def test_lsh_bands_cover_the_signature():
    bands, rows = lsh_params(0.9)
    assert bands * rows <= 64 and bands >= 1
    assert lsh_params(0.5)[0] > bands  # a lower threshold needs more, shorter bands
