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
