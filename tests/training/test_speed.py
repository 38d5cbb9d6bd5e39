"""Speed-ups that must not change what is computed: threads, packing where exact, the
completion-only LM head (lorad.training.speed), on the tiny in-process Llama."""

from __future__ import annotations

import os

import pytest
from training_helpers import sft_row

from lorad.training import speed


def _load(model_dir, attn_implementation="sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn_implementation)
    return model, tokenizer


def test_threads_are_the_cores_of_the_cpu_affinity_unless_omp_num_threads_says():
    cores = len(os.sched_getaffinity(0))
    assert speed.cpu_threads({}) == cores
    assert speed.cpu_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert speed.cpu_threads({"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
    assert speed.cpu_threads({"LOCAL_WORLD_SIZE": str(cores * 4)}) == 1


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packing_is_exact_with_transformers_masks(tiny_model_dir, implementation):
    """sdpa and eager build a block-diagonal mask from the restarting position ids."""
    model, tokenizer = _load(tiny_model_dir, implementation)
    assert speed.packing_problem(model, tokenizer) is None
    assert speed.decide_packing("auto", "sft", model, tokenizer)[0] is True


@pytest.fixture
def causal_only_attention():
    """An attention kernel that cannot take a mask (only "causal over the whole row"), as some
    fused kernels are: registered for real with transformers, not faked."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def causal_only(module, query, key, value, attention_mask, **kwargs):
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)

    AttentionInterface.register("lorad_causal_only", causal_only)
    ALL_MASK_ATTENTION_FUNCTIONS.register("lorad_causal_only", sdpa_mask)
    return "lorad_causal_only"


def test_packing_is_refused_where_the_attention_ignores_the_packed_mask(tiny_model_dir, causal_only_attention):
    model, tokenizer = _load(tiny_model_dir, causal_only_attention)
    problem = speed.packing_problem(model, tokenizer)
    assert problem and "does not keep packed rows apart" in problem and causal_only_attention in problem
    assert speed.decide_packing("auto", "sft", model, tokenizer) == (False, problem)
    with pytest.raises(speed.Refused, match=r"training.packing = true would not be exact"):
        speed.decide_packing(True, "sft", model, tokenizer)


def test_packing_setting_false_and_other_methods_never_pack(tiny_model_dir):
    model, tokenizer = _load(tiny_model_dir)
    assert speed.decide_packing(False, "sft", model, tokenizer)[0] is False
    assert speed.decide_packing("auto", "dpo", model, tokenizer)[0] is False
    with pytest.raises(speed.Refused, match="SFT rows only"):
        speed.decide_packing(True, "kto", model, tokenizer)


def test_liger_true_without_cuda_is_refused_with_the_reason():
    assert speed.use_liger(False, "cuda") is False
    assert speed.use_liger("auto", "cpu") is False
    with pytest.raises(speed.Refused, match="liger_kernel = true needs CUDA"):
        speed.use_liger(True, "cpu")


def _one_step_loss_and_grads(model_dir, tmp_path, *, completion_head: bool, packing: bool):
    import torch

    from lorad.training import lora

    torch.manual_seed(0)
    prec = lora.precision("cpu", "float32", False)
    model, tokenizer = lora.load_model(model_dir, prec)
    model = lora.attach_adapter(model, r=4, alpha=8, dropout=0.0, target_modules=("all-linear",))
    for name, p in model.named_parameters():  # B = 0 would give A no gradient: make both non-zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    args = lora.training_arguments(
        "sft",
        output_dir=str(tmp_path / "out"),
        prec=prec,
        learning_rate=1e-3,
        max_steps=1,
        epochs=1.0,
        batch_size=4,
        grad_accum=1,
        max_seq_length=64,
        save_steps=100,
        seed=0,
        packing=packing,
    )
    trainer = lora.trainer("sft", model, tokenizer, lora.dataset([sft_row(i) for i in range(4)], "sft"), args, [])
    installed = completion_head and speed.completion_head(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return installed, loss.item(), grads, batch


@pytest.mark.parametrize("packing", [True, False])
def test_completion_head_gives_the_same_loss_and_gradients_scoring_only_completion_tokens(
    tiny_model_dir, tmp_path, monkeypatch, packing
):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    _, loss_trl, grads_trl, _ = _one_step_loss_and_grads(
        tiny_model_dir, tmp_path, completion_head=False, packing=packing
    )
    scored = []
    real_apply = ChunkedLogProbFunction.apply

    def counting_apply(hidden, *rest):
        scored.append(hidden.shape[0])
        return real_apply(hidden, *rest)

    monkeypatch.setattr(ChunkedLogProbFunction, "apply", counting_apply)
    installed, loss, grads, batch = _one_step_loss_and_grads(
        tiny_model_dir, tmp_path, completion_head=True, packing=packing
    )
    assert installed
    assert loss == pytest.approx(loss_trl, rel=1e-5)
    for name, g in grads_trl.items():
        assert (grads[name] - g).abs().max().item() <= 1e-5 * (1 + g.abs().max().item()), name
    completion_tokens = int((batch["labels"][:, 1:] != -100).sum())
    positions = batch["labels"][:, 1:].numel()
    assert scored == [completion_tokens] and completion_tokens < positions  # prompt positions never projected
