"""The finite-logits health check on a held-out batch."""

from __future__ import annotations

import pytest
import torch

from lorad.evaluation.health import check_finite_logits

torch.set_num_threads(1)

ROWS = [
    {
        "prompt": [{"role": "user", "content": f"Write add{i}(a, b)."}],
        "completion": [{"role": "assistant", "content": f"def add{i}(a, b):\n    return a + b"}],
    }
    for i in range(3)
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorad.training.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("health") / "m")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_passes_a_model_with_finite_logits(tiny):
    model, tokenizer = tiny
    health = check_finite_logits(model, tokenizer, ROWS, batch_size=2, max_seq_length=64)
    assert health.ok and health.examples == 2


def test_fails_a_model_whose_weights_overflowed_and_says_how(tiny):
    import copy

    model, tokenizer = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.lm_head.weight[7].fill_(float("inf"))
    health = check_finite_logits(broken, tokenizer, ROWS, batch_size=3, max_seq_length=64)
    assert not health.ok
    assert "non-finite logits" in health.reason and "on a held-out batch of 3" in health.reason


def test_checks_preference_rows_and_an_empty_heldout_set_too(tiny):
    model, tokenizer = tiny
    dpo = [{"prompt": ROWS[0]["prompt"], "chosen": ROWS[0]["completion"], "rejected": ROWS[1]["completion"]}]
    assert check_finite_logits(model, tokenizer, dpo, batch_size=4, max_seq_length=64).ok
    assert check_finite_logits(model, tokenizer, [], batch_size=4, max_seq_length=64).examples == 1
