"""lorad's vllm publish hook against a real vLLM: the CPU build, serving SmolLM2-135M-Instruct (slow).

vLLM runs from its own venv (`make vllm` builds .venv-vllm; .ci/run does). A version made from
a random rank-8 adapter on every linear layer is promoted, and the hook loads it under its
versioned name while vLLM serves; the adapted greedy answer is not the base's, and its first
token is the one peft's fp32 model of the same adapter picks; a second promotion loads the new
name and unloads the old one, and a rollback brings the first back.
"""

from __future__ import annotations

import pytest

from lorad.config import PublishSettings
from lorad.loop import server
from lorad.release.hooks import hooks_from_settings, publish
from lorad.release.registry import Registry
from lorad.training.base_model import convert_gguf, smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # vLLM's start alone may take 600 s

PROMPTS = [
    "Write a Python function that returns the sum of a list.",
    "What is the capital of France?",
    "def fib(n):",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
    "Fix: for i in range(1, len(xs)): print(xs[i])",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    python = server.vllm_python()
    if python is None:
        pytest.skip("vLLM's CPU build is not installed: `make vllm` builds .venv-vllm (.ci/run does)")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("vllm")
    base_dir = convert_gguf(smollm2_gguf(), root / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    adapters, first_tokens = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)  # strong enough to change every answer
        model.eval()
        picks = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}],
                    add_generation_prompt=True,
                    return_tensors="pt",
                    return_dict=True,
                )["input_ids"]
                picks.append(tokenizer.decode([int(model(input_ids=ids).logits[0, -1].argmax())]))
        first_tokens.append(picks)
        model.save_pretrained(root / f"adapter-{seed}")
        adapters.append(root / f"adapter-{seed}")
    vllm = server.VllmServer(python, str(base_dir), 8093, root / "vllm.log", dtype="float32")
    vllm.start()
    try:
        yield {"url": vllm.url, "adapters": adapters, "first_tokens": first_tokens, "root": root}
    finally:
        vllm.stop()


def answers(url: str, model: str, max_tokens: int = 12) -> list[str]:
    return [server.chat(url, model, [{"role": "user", "content": p}], max_tokens=max_tokens) for p in PROMPTS]


def test_the_vllm_hook_serves_each_promoted_version_and_follows_a_rollback(served, tmp_path):
    url = served["url"]
    reg = Registry(tmp_path / "adapters")
    hooks = hooks_from_settings([PublishSettings(kind="vllm", url=url, timeout=120.0, retries=1)])
    v1 = reg.create(served["adapters"][0], {"verdict": {"promote": True, "reasons": []}}).name
    report = publish(reg, reg.promote(v1), hooks)
    assert report.ok, report.as_dict()
    assert f"lorad-{v1}" in server.models(url)

    base, adapted = answers(url, "base"), answers(url, f"lorad-{v1}")
    assert sum(a != b for a, b in zip(base, adapted, strict=True)) >= 5, (base, adapted)
    firsts = [server.chat(url, f"lorad-{v1}", [{"role": "user", "content": p}], max_tokens=1) for p in PROMPTS]
    agree = sum(a.strip() == b.strip() for a, b in zip(firsts, served["first_tokens"][0], strict=True))
    print(f"first greedy token, vLLM vs peft: {agree}/{len(PROMPTS)} agree ({firsts} vs {served['first_tokens'][0]})")
    assert agree >= 4

    v2 = reg.create(served["adapters"][1], {"verdict": {"promote": True, "reasons": []}}).name
    assert publish(reg, reg.promote(v2), hooks).ok
    names = server.models(url)
    assert f"lorad-{v2}" in names and f"lorad-{v1}" not in names
    assert answers(url, f"lorad-{v2}") != adapted

    assert publish(reg, reg.rollback(None, reason="test"), hooks).ok
    names = server.models(url)
    assert f"lorad-{v1}" in names and f"lorad-{v2}" not in names
    assert answers(url, f"lorad-{v1}") == adapted
