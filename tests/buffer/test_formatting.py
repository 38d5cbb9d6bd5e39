"""The conditioning format: what the model is shown, with and without history."""

from __future__ import annotations

import json

import pytest

from lorad.buffer import formatting
from lorad.buffer.formatting import (
    HISTORY_HEADING,
    Template,
    TemplateError,
    chat,
    dpo_pairs,
    kto_rows,
    load_role,
    load_template,
    prompt,
)
from lorad.buffer.traces import link


def make_chain(attempts, *, spec="Write add(a, b).", constraints="Return only code.", origin="generated"):
    """attempts: [(content, status, feedback)] in order."""
    rows, prev = [], None
    for i, (content, status, feedback) in enumerate(attempts):
        aid = f"a{i}"
        rows.append(
            {
                "id": i + 1,
                "source": "s",
                "locator": aid,
                "artifact_id": aid,
                "workflow_id": "w",
                "action_pair_id": "g_coder",
                "previous_attempt_id": prev,
                "attempt_number": i + 1,
                "status": status,
                "created_ts": float(i),
                "content": content,
                "feedback": feedback,
                "specification": spec,
                "constraints": constraints,
                "origin": origin,
                "feedback_history": None,
                "content_hash": f"h{i}",
            }
        )
        prev = aid
    (c,) = link(rows)
    return c


REFINED = make_chain(
    [
        ("def add(a, b): return a - b", "rejected", "add(1, 2) returned -1, expected 3"),
        ("def add(a, b) return a + b", "rejected", "SyntaxError: expected ':'"),
        ("def add(a, b): return a + b", "accepted", "All tests passed"),
    ]
)


def test_chat_is_system_constraints_user_spec_with_history_then_the_accepted_answer():
    messages = chat(REFINED)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Return only code."
    user = messages[1]["content"]
    assert user.startswith("Write add(a, b).\n\n" + HISTORY_HEADING + ":")
    assert (
        user.index("return a - b") < user.index("expected 3") < user.index("return a + b") < user.index("SyntaxError")
    )
    assert messages[2]["content"] == "def add(a, b): return a + b"


def test_first_attempt_prompt_has_no_history():
    messages = prompt(REFINED, history=False)
    assert messages == [
        {"role": "system", "content": "Return only code."},
        {"role": "user", "content": "Write add(a, b)."},
    ]


def test_history_keeps_only_the_last_max_history_rejected_attempts():
    user = chat(REFINED, max_history=1)[1]["content"]
    assert "return a - b" not in user and "SyntaxError" in user
    assert "Attempt 2:" in user  # numbered as in the chain
    assert HISTORY_HEADING not in chat(REFINED, max_history=0)[1]["content"]


def test_each_shown_attempt_is_cut_to_max_artifact_chars():
    long = "x" * 500
    c = make_chain([(long, "rejected", "f" * 300), ("ok", "accepted", "")])
    user = chat(c, max_artifact_chars=40)[1]["content"]
    block = user.split("```\n")[1].split("\n```")[0]
    assert block.startswith("x" * 40) and "x" * 41 not in block
    assert "460 more characters cut" in block
    assert "f" * 41 not in user and "260 more characters cut" in user


def test_a_text_read_cut_and_cut_again_for_the_history_counts_what_the_original_lost():
    """Texts are read cut to selection.max_text_chars (the rest only counted); cutting one
    shorter for the history says how much of the original is missing, not of the cut copy."""
    read = formatting.truncate("x" * 100, 100, length=10_000)
    assert read == "x" * 100 + "\n[... 9900 more characters cut]"
    assert formatting.truncate(read, 40) == "x" * 40 + "\n[... 9960 more characters cut]"
    assert formatting.truncate(read, 500) == read  # the history limit is the longer one
    assert formatting.truncate("short", 40) == "short"


def test_feedback_missing_on_the_row_is_taken_from_a_later_attempts_history():
    c = make_chain([("bad", "rejected", ""), ("good", "accepted", "")])
    rows = list(c.rows)
    rows[1] = rows[1] | {"feedback_history": json.dumps([{"artifact_id": "a0", "feedback": "off by one"}])}
    (c,) = link(rows)
    assert "Feedback: off by one" in chat(c)[1]["content"]


def test_no_system_message_without_role_or_constraints():
    c = make_chain([("x", "accepted", "")], constraints="")
    assert [m["role"] for m in chat(c)] == ["user", "assistant"]
    assert chat(c, template=Template(role="You are a coder."))[0] == {"role": "system", "content": "You are a coder."}


def test_role_from_a_prompts_json_entry_comes_before_the_constraints(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"g_coder": {"role": "You write Python.", "task": "t"}, "plain": "Be brief."}))
    template = load_template(f"{path}:g_coder")
    assert chat(REFINED, template=template)[0]["content"] == "You write Python.\n\nReturn only code."
    assert load_role(f"{path}:plain") == "Be brief."
    with pytest.raises(TemplateError, match="no entry 'missing'"):
        load_role(f"{path}:missing")
    with pytest.raises(TemplateError, match="FILE:KEY"):
        load_role(str(path))
    with pytest.raises(TemplateError, match="cannot read"):
        load_role(f"{tmp_path / 'nope.json'}:g_coder")


def test_dpo_pairs_each_rejected_attempt_with_the_accepted_one_on_the_first_attempt_prompt():
    pairs = dpo_pairs(REFINED)
    assert len(pairs) == 2
    for p, chosen, rejected, row in pairs:
        assert p == prompt(REFINED, history=False)
        assert chosen == [{"role": "assistant", "content": "def add(a, b): return a + b"}]
        assert rejected == [{"role": "assistant", "content": row["content"]}] and row["status"] == "rejected"
    assert dpo_pairs(make_chain([("x", "accepted", "")])) == []


def test_kto_rows_are_unpaired_and_include_chains_that_never_succeeded():
    assert [label for *_, label, _ in kto_rows(REFINED)] == [False, False, True]
    exhausted = make_chain([("a", "rejected", "no"), ("b", "rejected", "no")])
    assert [label for *_, label, _ in kto_rows(exhausted)] == [False, False]
    with pytest.raises(ValueError):
        chat(exhausted)


def test_truncate_leaves_short_text_alone():
    assert formatting.truncate("abc", 3) == "abc"
