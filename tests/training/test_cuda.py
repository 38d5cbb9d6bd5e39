"""The CUDA path: bf16 LoRA, 4-bit QLoRA, batched generation, finite logits, and the memory
estimate against the measured peak. Skipped where torch.cuda.is_available() is false; run on a
GPU machine with ``pytest -m cuda tests/training/test_cuda.py``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training_helpers import run_worker, sft_row  # noqa: E402

from lorad.training import jobdir as jobfile  # noqa: E402
from lorad.training import resources  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _adapter_changed(job_dir) -> bool:
    from safetensors.torch import load_file

    weights = load_file(job_dir / jobfile.ADAPTER_DIR / "adapter_model.safetensors")
    return any(float(w.abs().max()) > 0 for name, w in weights.items() if "lora_B" in name)


def test_bf16_lora_step_on_cuda_trains_the_adapter(make_job):
    job_dir = make_job(quantization="none", max_steps=4)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out
    assert result.device == "cuda" and result.memory_estimate["dtype"] == "bfloat16"
    assert result.speed["gradient_checkpointing"] is True and result.speed["completion_head"] is True
    assert result.health["ok"] and _adapter_changed(job_dir)


@pytest.mark.skipif(not resources.bitsandbytes_available(), reason="needs bitsandbytes")
def test_4bit_qlora_step_on_cuda_trains_the_adapter(make_job):
    job_dir = make_job(quantization="4bit", max_steps=4)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out
    assert result.memory_estimate["dtype"] == "4bit" and result.health["ok"] and _adapter_changed(job_dir)


def _cuda_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
    return model, tokenizer


def test_batched_generation_on_cuda_gives_the_answers_of_one_at_a_time(tiny_model_dir):
    from lorad.evaluation.metrics import generate

    model, tokenizer = _cuda_model(tiny_model_dir)
    prompts = [sft_row(i)["prompt"] for i in range(6)]
    batched = generate(model, tokenizer, prompts, batch_size=6, max_new_tokens=8, max_seq_length=128)
    single = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=8, max_seq_length=128)[0] for p in prompts]
    assert len(batched) == 6
    # bf16 rounding may flip a near-tie in a random model; most answers must agree exactly.
    assert sum(a == b for a, b in zip(batched, single, strict=True)) >= 4


def test_finite_logit_check_passes_in_bf16_on_cuda(tiny_model_dir):
    from lorad.evaluation.health import check_finite_logits

    model, tokenizer = _cuda_model(tiny_model_dir)
    health = check_finite_logits(model, tokenizer, [sft_row(i) for i in range(4)], batch_size=4, max_seq_length=128)
    assert health.ok, health.reason


def test_memory_estimate_bounds_the_measured_peak_gpu_memory(tmp_path, make_job):
    """The estimate (less the process allowance, which torch's allocator does not see) against
    torch.cuda.max_memory_allocated() of the worker: within a factor of 2 either way."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorad.training.tiny import train_tokenizer

    tokenizer = train_tokenizer(512)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    job_dir = make_job(
        rows=[sft_row(i) for i in range(800)],
        base_model=str(tmp_path / "model"),
        quantization="none",
        batch_size=8,
        max_seq_length=512,
        max_steps=3,
    )
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out
    est = result.memory_estimate
    predicted = est["total"] - est["framework"]
    assert 0.5 <= result.peak_memory_bytes / predicted <= 2.0, (result.peak_memory_bytes, est)
