"""Held-out metrics on a tiny model built in the test."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from lorad.evaluation import metrics  # noqa: E402
from lorad.training.tiny import build_tiny_model  # noqa: E402


def _rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        spec = f"Write add{i}(a, b) returning a + b + {i}." if i % 2 == 0 else f"spec-{i}"
        rows.append(
            {
                "prompt": [{"role": "user", "content": spec}],
                "completion": [{"role": "assistant", "content": f"def add{i}(a, b):\n    return a + b + {i}\n"}],
                "specification": "yes" if i % 3 == 0 else "no",
                "chain_id": f"c{i}",
            }
        )
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    path = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config, adapter_name="fresh")
    model.add_adapter("fitted", config)
    # Fit "fitted" to the held-out completions so its loss must fall below the base model's.
    model.set_adapter("fitted")
    encoded = [metrics.encode_example(tokenizer, r, 64) for r in _rows()]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(30):
        for ids, start in encoded:
            x = torch.tensor([ids])
            labels = x.clone()
            labels[0, :start] = -100
            loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            optim.step()
            optim.zero_grad()
    return model, tokenizer


def test_fresh_adapter_scores_exactly_like_the_base_model(tiny):
    """A LoRA adapter initialised with B = 0 is the identity: same NLL as the bare base."""
    model, tok = tiny
    out = metrics.evaluate(
        model, tok, _rows(), adapters={"base": None, "fresh": "fresh"}, batch_size=4, max_seq_length=64
    )
    assert out["base"]["tokens"] == out["fresh"]["tokens"] > 0
    assert out["base"]["examples"] == 6
    assert out["base"]["nll"] == pytest.approx(out["fresh"]["nll"], rel=1e-5)
    assert out["base"]["perplexity"] == pytest.approx(math.exp(out["base"]["nll"]))
    assert "epsilon" not in out["base"]


def test_adapter_fitted_to_the_answers_has_lower_heldout_loss(tiny):
    model, tok = tiny
    out = metrics.evaluate(
        model, tok, _rows(), adapters={"candidate": "fitted", "active": None}, batch_size=4, max_seq_length=64
    )
    assert out["candidate"]["nll"] < out["active"]["nll"] - 0.2, out


def test_loss_counts_only_completion_tokens_and_batching_does_not_change_it(tiny):
    model, tok = tiny
    rows = _rows()
    expected = 0
    for r in rows:
        ids, start = metrics.encode_example(tok, r, 64)
        prompt = tok.apply_chat_template(r["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)[
            "input_ids"
        ]
        assert ids[:start] == list(prompt)
        expected += len(ids) - start  # every completion token is predicted once
    one = metrics.evaluate(model, tok, rows, adapters={"a": None}, batch_size=1, max_seq_length=64)["a"]
    four = metrics.evaluate(model, tok, rows, adapters={"a": None}, batch_size=4, max_seq_length=64)["a"]
    assert one["tokens"] == four["tokens"] == expected
    assert one["nll"] == pytest.approx(four["nll"], rel=1e-5)


def test_loss_from_the_answers_logits_alone_equals_the_full_forward(tiny):
    """Only answer positions reach the LM head; the NLL is the model's own loss over every position."""
    model, tok = tiny
    rows = _rows()
    total, tokens = 0.0, 0
    with torch.no_grad(), model.disable_adapter():  # adapters={"a": None}: the bare base
        for r in rows:
            ids, start = metrics.encode_example(tok, r, 64)
            x = torch.tensor([ids])
            labels = x.clone()
            labels[0, :start] = -100
            n = len(ids) - start
            total += float(model(input_ids=x, labels=labels).loss) * n
            tokens += n
    out = metrics.evaluate(model, tok, rows, adapters={"a": None}, batch_size=4, max_seq_length=64)["a"]
    assert out["tokens"] == tokens
    assert out["nll"] == pytest.approx(total / tokens, rel=1e-5)


def test_example_cut_before_its_answer_counts_for_nothing(tiny):
    model, tok = tiny
    rows = _rows(2)
    _, start = metrics.encode_example(tok, rows[0], 512)
    out = metrics.evaluate(model, tok, rows[:1], adapters={"a": None}, batch_size=1, max_seq_length=start)
    assert out["a"]["examples"] == 0 and out["a"]["tokens"] == 0


def test_batched_left_padded_generation_matches_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [r["prompt"] for r in _rows(4)]
    model.set_adapter("fitted")
    batched = metrics.generate(model, tok, prompts, batch_size=4, max_new_tokens=12, max_seq_length=64)
    single = metrics.generate(model, tok, prompts, batch_size=1, max_new_tokens=12, max_seq_length=64)
    assert batched == single
    assert len(batched) == 4


def test_guard_verdicts_give_epsilon_for_each_model_on_every_task(tiny, tmp_path):
    """The guard sees the specification in $LORAD_SPECIFICATION; exit 0 accepts. Every row is
    generated for, a task without an accepted answer (exhausted) too; only rows with one
    count for the loss."""
    guard = tmp_path / "guard.py"
    guard.write_text(
        textwrap.dedent("""
        import os, sys
        sys.stdin.read()
        ok = os.environ["LORAD_SPECIFICATION"] == "yes"
        print("fine" if ok else "spec says no")
        sys.exit(0 if ok else 1)
    """)
    )
    model, tok = tiny
    rows = _rows(6)  # specifications: yes, no, no, yes, no, no
    for i, r in enumerate(rows):
        r["task_key"] = f"task{i}"
    rows[5]["completion"] = None  # exhausted: no accepted answer
    out = metrics.evaluate(
        model,
        tok,
        rows,
        adapters={"candidate": "fitted", "active": None},
        batch_size=4,
        max_seq_length=64,
        guard_command=[sys.executable, str(guard)],
        guard_timeout=20,
        max_new_tokens=8,
    )
    for label in ("candidate", "active"):
        m = out[label]
        assert m["examples"] == 5
        assert m["generated"] == 6 and m["accepted"] == 2
        assert m["epsilon"] == pytest.approx(2 / 6)
        assert [g["chain_id"] for g in m["guard"]] == ["c0", "c1", "c2", "c3", "c4", "c5"]
        assert [g["task_key"] for g in m["guard"]] == [f"task{i}" for i in range(6)]
        assert [g["accepted"] for g in m["guard"]] == [True, False, False, True, False, False]
        assert m["guard"][1]["feedback"] == "spec says no"


def test_guard_timeout_counts_as_rejection(tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    ok, feedback = metrics.run_guard([sys.executable, str(slow)], "x = 1\n", "spec", timeout=0.5)
    assert not ok and "timed out" in feedback


def test_guard_receives_the_code_inside_a_fenced_answer(tmp_path):
    echo = tmp_path / "echo.py"
    echo.write_text("import sys\nsys.stdout.write(sys.stdin.read())\n")
    answer = "Here you go:\n```python\ndef f():\n    return 1\n```\nDone."
    ok, feedback = metrics.run_guard([sys.executable, str(echo)], metrics.extract_code(answer), "", 10)
    assert ok and feedback == "def f():\n    return 1"
