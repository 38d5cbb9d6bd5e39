"""Helpers for the training tests: small row sets in each method's format, and running the real
worker on a job directory as a subprocess (the way the daemon does)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lorad.training import jobdir as jobfile

SPECS = [
    ("is_even(n)", "def is_even(n):\n    return n % 2 == 0"),
    ("add(a, b)", "def add(a, b):\n    return a + b"),
    ("reverse(s)", "def reverse(s):\n    return s[::-1]"),
    ("square(x)", "def square(x):\n    return x * x"),
    ("first(xs)", "def first(xs):\n    return xs[0]"),
    ("last(xs)", "def last(xs):\n    return xs[-1]"),
    ("neg(x)", "def neg(x):\n    return -x"),
    ("double(x)", "def double(x):\n    return 2 * x"),
]


def sft_row(i: int) -> dict:
    name, code = SPECS[i % len(SPECS)]
    return {
        "prompt": [
            {"role": "system", "content": "Answer with code only."},
            {"role": "user", "content": f"Write {name}. Attempt {i}."},
        ],
        "completion": [{"role": "assistant", "content": code}],
        "specification": f"Write {name}.",
        "chain_id": f"c{i}",
        "metadata": {"i": i},
    }


def dpo_row(i: int) -> dict:
    r = sft_row(i)
    return {
        "prompt": r["prompt"],
        "chosen": r["completion"],
        "rejected": [{"role": "assistant", "content": "def f(x):\n    pass"}],
    }


def kto_row(i: int) -> dict:
    r = sft_row(i // 2)
    good = i % 2 == 0
    answer = r["completion"] if good else [{"role": "assistant", "content": "return None"}]
    return {"prompt": r["prompt"], "completion": answer, "label": good}


# An accelerate config for two FSDP2 ranks, as lorad accepts it (on the CPU: gloo).
FSDP2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
"""


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_worker(job_dir: Path) -> subprocess.Popen:
    """Start the worker; its output goes to JOB_DIR/worker.log (read it with :func:`output`)."""
    spec = jobfile.read_job(job_dir)
    with open(Path(job_dir) / "worker.log", "a") as log:
        return subprocess.Popen(
            jobfile.worker_command(job_dir, spec), env=worker_env(), stdout=log, stderr=subprocess.STDOUT
        )


def make_spec(job_id: str = "j", base_model: str = "m", state_dir: str = "s", **overrides) -> jobfile.JobSpec:
    """A JobSpec with the config defaults (as a config.toml without [training] would give),
    then ``overrides``."""
    import dataclasses

    from lorad.config import EvaluationSettings, TrainingSettings

    spec = jobfile.build_spec(job_id, state_dir, TrainingSettings(base_model=base_model), EvaluationSettings())
    return dataclasses.replace(spec, **overrides)


def training_starts(job_dir: Path) -> list[dict]:
    """The progress records with which the worker started (or resumed) training, in order."""
    return [r for r, _ in jobfile.iter_progress(job_dir) if r["stage"] == "training" and r.get("loss") is None]


def output(job_dir: Path) -> str:
    return (Path(job_dir) / "worker.log").read_text(errors="replace")[-4000:]


def run_worker(job_dir: Path, timeout: float = 300) -> tuple[int, jobfile.Result | None, str]:
    """Run the worker to its end: (exit code, result.json, the end of its output)."""
    proc = start_worker(job_dir)
    proc.wait(timeout=timeout)
    return proc.returncode, jobfile.read_result(job_dir), output(job_dir)


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write a saved tiny Llama and its BPE tokenizer as an F32 GGUF file (gguf's writer),
    laid out the way llama.cpp lays out Llama checkpoints (q/k rows interleaved per head)."""
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    template = (model_dir / "chat_template.jinja").read_text()
    weights = load_file(model_dir / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads

    def interleave(w, n_head):
        # HF keeps each head's rotary halves apart; GGUF interleaves them (the loader undoes it).
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(
        float(config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0))
    )
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf, gg in names.items():
            w = weights[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = interleave(w, heads)
            elif gg == "attn_k":
                w = interleave(w, kv_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def adapter_like_single(single: Path, job_dir: Path, base_model: Path):
    """Check that ``job_dir``'s adapter (a run of several ranks) has the tensors and shapes of
    ``single``'s (one process) and gives finite logits on ``base_model``; returns the loaded
    peft model and a prompt's ids for further checks."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(job_dir / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), job_dir / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    return model, ids
