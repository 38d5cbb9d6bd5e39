"""LoRA setup and training in-process on the tiny Llama (the worker's building blocks)."""

from __future__ import annotations

import torch
from training_helpers import sft_row

from lorad.training import lora
from lorad.training.checkpoints import save_adapter

torch.set_num_threads(1)


def _train(model_dir, tmp_path, steps=4):
    prec = lora.precision("cpu", "float32", gradient_checkpointing=True)
    model, tokenizer = lora.load_model(str(model_dir), prec)
    model = lora.attach_adapter(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = lora.training_arguments(
        "sft",
        output_dir=str(tmp_path / "out"),
        prec=prec,
        learning_rate=5e-3,
        max_steps=steps,
        epochs=1,
        batch_size=2,
        grad_accum=1,
        max_seq_length=64,
        save_steps=1000,
        seed=0,
    )
    trainer = lora.trainer("sft", model, tokenizer, lora.dataset([sft_row(i) for i in range(8)], "sft"), args, [])
    trainer.train()
    return trainer.model, tokenizer, before


def test_training_changes_every_lora_weight_and_no_base_weight(tiny_model_dir, tmp_path):
    model, _, before = _train(tiny_model_dir, tmp_path)
    after = dict(model.named_parameters())
    lora_names = [n for n in before if "lora_" in n]
    # 2 layers x 7 linear modules x (A, B)
    assert len(lora_names) == 28
    for name, old in before.items():
        new = after[name].detach()
        if "lora_" in name:
            assert not torch.equal(old, new), f"LoRA weight {name} did not change"
            assert after[name].requires_grad
        else:
            assert torch.equal(old, new), f"base weight {name} changed"
            assert not after[name].requires_grad


def test_saved_adapter_reloads_and_gives_the_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = _train(tiny_model_dir, tmp_path)
    ids = tokenizer.apply_chat_template(
        sft_row(3)["prompt"] + sft_row(3)["completion"], return_tensors="pt", return_dict=True
    )
    model.eval()
    with torch.no_grad():
        expected = model(**ids).logits
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    adapter = save_adapter(model, job_dir)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        bare = base(**ids).logits
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        got = reloaded(**ids).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, bare, atol=1e-4)  # the adapter really does something


def test_warm_start_continues_from_the_parent_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer, _ = _train(tiny_model_dir, tmp_path)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    parent = save_adapter(model, job_dir)
    prec = lora.precision("cpu", "float32", gradient_checkpointing=False)
    base, _ = lora.load_model(str(tiny_model_dir), prec)
    warm = lora.attach_adapter(
        base, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"], parent_adapter=str(parent)
    )
    saved = load_file(parent / "adapter_model.safetensors")
    params = dict(warm.named_parameters())
    for key, value in saved.items():
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), value), key
        assert params[name].requires_grad


def test_sft_loss_counts_only_the_assistant_answer(tiny_model_dir, tmp_path):
    """Prompt tokens (system, user turn with its feedback history) carry label -100."""
    prec = lora.precision("cpu", "float32", gradient_checkpointing=False)
    model, tokenizer = lora.load_model(str(tiny_model_dir), prec)
    model = lora.attach_adapter(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    args = lora.training_arguments(
        "sft",
        output_dir=str(tmp_path / "out"),
        prec=prec,
        learning_rate=1e-3,
        max_steps=1,
        epochs=1,
        batch_size=2,
        grad_accum=1,
        max_seq_length=64,
        save_steps=10,
        seed=0,
    )
    rows = [sft_row(0), sft_row(2)]
    trainer = lora.trainer("sft", model, tokenizer, lora.dataset(rows, "sft"), args, [])
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for labels, row in zip(batch["labels"], rows, strict=True):
        counted = tokenizer.decode([i for i in labels.tolist() if i != -100])
        assert counted == row["completion"][0]["content"] + "<|im_end|>\n"


def test_sharded_qlora_stores_the_quantized_weights_in_the_compute_dtype():
    """FSDP shards floating-point tensors only, and a layer's together only when they share a
    dtype: sharded, the 4-bit storage is bf16 like the computation; alone, bitsandbytes' uint8."""
    sharded = lora.quantization_config(sharded=True)
    assert sharded.load_in_4bit and sharded.bnb_4bit_quant_type == "nf4"
    assert sharded.bnb_4bit_quant_storage == sharded.bnb_4bit_compute_dtype == torch.bfloat16
    alone = lora.quantization_config(sharded=False)
    assert alone.bnb_4bit_quant_storage == torch.uint8 and alone.bnb_4bit_compute_dtype == torch.bfloat16
