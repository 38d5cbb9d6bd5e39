"""Memory estimate, the fit check and its suggestion, and the learning-rate range."""

from __future__ import annotations

import pytest

from lorad.training import resources
from lorad.training.resources import Device, ModelShape, ResourceError

GIB = 2**30
SHAPE_135M = ModelShape(parameters=134_515_008, hidden_size=576, layers=30, vocab_size=49152, lora_parameters=2_442_240)


@pytest.mark.parametrize("lr", [0.0, -1e-4, 1e-9, 0.02, 1.0])
def test_rejects_learning_rate_outside_sane_range(lr):
    with pytest.raises(ResourceError, match="outside the sane range"):
        resources.check_learning_rate(lr)


@pytest.mark.parametrize("lr", [1e-7, 2e-4, 1e-2])
def test_accepts_learning_rate_inside_range(lr):
    resources.check_learning_rate(lr)


def test_estimate_grows_with_batch_and_sequence_and_shrinks_with_bf16():
    fp32 = resources.estimate(SHAPE_135M, batch_size=4, seq_length=512, dtype="float32", gradient_checkpointing=False)
    assert fp32.weights == SHAPE_135M.parameters * 4
    assert fp32.lora == SHAPE_135M.lora_parameters * 16
    bigger = resources.estimate(SHAPE_135M, batch_size=8, seq_length=512, dtype="float32", gradient_checkpointing=False)
    assert bigger.activations == 2 * fp32.activations
    bf16 = resources.estimate(SHAPE_135M, batch_size=4, seq_length=512, dtype="bfloat16", gradient_checkpointing=True)
    assert bf16.weights == fp32.weights // 2 and bf16.activations < fp32.activations


def test_refuses_a_run_too_big_for_the_device_and_suggests_one_that_fits():
    small_gpu = Device("cuda", "test", total_bytes=2 * GIB, free_bytes=2 * GIB, bf16=True)
    with pytest.raises(ResourceError) as e:
        resources.check_fits(
            SHAPE_135M,
            small_gpu,
            batch_size=64,
            seq_length=2048,
            dtype="bfloat16",
            gradient_checkpointing=True,
            headroom=0.9,
        )
    message = str(e.value)
    assert "cuda has 2.00 GiB free" in message and "try training.batch_size = " in message
    b, s = resources.suggest(
        SHAPE_135M, int(2 * GIB * 0.9), batch_size=64, seq_length=2048, dtype="bfloat16", gradient_checkpointing=True
    )
    assert f"training.batch_size = {b} and training.max_seq_length = {s}" in message
    fitting = resources.check_fits(
        SHAPE_135M, small_gpu, batch_size=b, seq_length=s, dtype="bfloat16", gradient_checkpointing=True, headroom=0.9
    )
    assert fitting.total <= 2 * GIB * 0.9


def test_refusal_says_so_when_nothing_fits():
    tiny = Device("cpu", "test", total_bytes=GIB, free_bytes=GIB // 4, bf16=False)
    with pytest.raises(ResourceError, match="even batch_size 1 with max_seq_length 64 does not fit"):
        resources.check_fits(
            SHAPE_135M, tiny, batch_size=4, seq_length=512, dtype="float32", gradient_checkpointing=False, headroom=0.9
        )


def test_model_shape_counts_parameters_without_loading_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    shape = resources.model_shape(str(tiny_model_dir), 4, ["all-linear"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert (shape.hidden_size, shape.layers, shape.vocab_size) == (32, 2, 512)
    # q,k,v,o,gate,up,down per layer; r * (in + out) each
    per_layer = 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert shape.lora_parameters == 2 * per_layer
    assert shape.tied_embeddings is False  # the tiny Llama has its own output head
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.layer_parameters == layer + model.model.norm.weight.numel() // 2  # the final norm, spread


# Llama-3-70B's shape (untied head); LoRA r 16 on every linear layer.
SHAPE_70B = ModelShape(
    parameters=70_553_706_496,
    hidden_size=8192,
    layers=80,
    vocab_size=128_256,
    lora_parameters=207_093_760,
    tied_embeddings=False,
)


@pytest.mark.parametrize("shape", [SHAPE_135M, SHAPE_70B])
def test_sharded_estimate_is_per_rank_with_the_units_gathered_whole(shape):
    """FSDP2: 1/N of the weights and of LoRA + optimizer on each rank, plus two decoder layers and
    the output head held whole while they compute; activations are each rank's own batch."""
    fit = dict(batch_size=1, seq_length=1024, dtype="4bit", gradient_checkpointing=True)
    whole = resources.estimate(shape, **fit)
    two = resources.estimate(shape, **fit, shards=2)
    eight = resources.estimate(shape, **fit, shards=8)
    gathered = int((2 * shape.layer_parameters + shape.vocab_size * shape.hidden_size) * 0.5625)
    assert (two.shards, two.gathered) == (2, gathered)
    assert two.weights == -(-whole.weights // 2) + gathered
    assert eight.weights == -(-whole.weights // 8) + gathered
    assert two.lora == -(-whole.lora // 2) and eight.lora == -(-whole.lora // 8)
    assert two.activations == eight.activations == whole.activations
    assert eight.total < two.total < whole.total
    assert two.as_dict()["shards"] == 2


def test_a_model_too_big_for_one_device_fits_sharded_over_enough_of_them():
    """70B in 4 bits needs about 37 GiB of weights: not one 24 GiB card nor two, but four."""
    card = Device("cuda", "24 GiB card", total_bytes=24 * GIB, free_bytes=24 * GIB, bf16=True)
    fit = dict(batch_size=1, seq_length=1024, dtype="4bit", gradient_checkpointing=True, headroom=0.9)
    with pytest.raises(ResourceError, match=r"per rank of 2 \(FSDP2\)"):
        resources.check_fits(SHAPE_70B, card, **fit, shards=2)
    with pytest.raises(ResourceError, match=r"the run needs about .* GiB \(weights"):
        resources.check_fits(SHAPE_70B, card, **fit)
    assert resources.check_fits(SHAPE_70B, card, **fit, shards=4).total <= 0.9 * 24 * GIB
    # fsdp_offload_params: the shards in host memory, only the gathered units on the card.
    offloaded = resources.check_fits(SHAPE_70B, card, **fit, shards=2, offload=True)
    assert offloaded.weights == offloaded.gathered and offloaded.offload


def test_cpu_training_is_fp32_and_never_4bit():
    cpu = Device("cpu", "x", GIB, GIB, bf16=False)
    assert resources.training_dtype(cpu, "auto") == "float32"
    assert resources.training_dtype(cpu, "4bit") == "float32"
    gpu = Device("cuda", "x", GIB, GIB, bf16=True)
    assert resources.training_dtype(gpu, "none") == "bfloat16"


MEASURE = """
import sys, torch
from lorad.training import lora, speed
from training_helpers import sft_row

def vm(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

model_dir, batch, seq, dropout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
torch.set_num_threads(1)
prec = lora.precision("cpu", "float32", False)
model, tok = lora.load_model(model_dir, prec)
model = lora.attach_adapter(model, r=4, alpha=8, dropout=dropout, target_modules=["all-linear"])
rows = [sft_row(i) for i in range(400)]  # enough short rows to fill every packed sequence
args = lora.training_arguments("sft", output_dir=model_dir + "-out", prec=prec, learning_rate=1e-4, max_steps=2,
                               epochs=1.0, batch_size=batch, grad_accum=1, max_seq_length=seq, save_steps=100,
                               seed=0, packing=True)
trainer = lora.trainer("sft", model, tok, lora.dataset(rows, "sft"), args, [])
speed.completion_head(trainer.model)
before = vm("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
trainer.train()
print(vm("VmHWM") - before)
"""


def test_estimate_is_within_a_factor_of_two_of_the_measured_training_peak(tmp_path):
    """The estimate's run-dependent part (activations, LM head, LoRA + optimizer) against the
    resident memory a real training run adds at its peak (VmHWM, reset just before training;
    a fresh process, as the worker is), on a model big enough that those terms dominate."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorad.training.tiny import train_tokenizer

    tokenizer = train_tokenizer(512)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    batch, seq, dropout = 8, 256, 0.05
    shape = resources.model_shape(str(model_dir), 4, ["all-linear"])
    est = resources.estimate(
        shape, batch_size=batch, seq_length=seq, dtype="float32", gradient_checkpointing=False, lora_dropout=dropout > 0
    )
    here = Path(__file__).parent
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(here), str(here.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), str(batch), str(seq), str(dropout)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = int(proc.stdout.strip().splitlines()[-1])
    predicted = est.activations + est.lora
    assert 0.5 <= measured / predicted <= 2.0, (measured / 2**20, predicted / 2**20)
