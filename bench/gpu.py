"""The GPU benchmark: lorad's worker against a plain trl script, and what each speed setting buys.

One script, one table, under 5 minutes on one H200 (`--tiny`: a minute on a CPU, which a test
runs so the script never rots). For Llama-architecture models built here with random weights
(no download) at about 0.5B and 1.5B parameters, seq 1024, bf16 on CUDA (fp32 on the CPU), the
same mixed-length SFT rows, the same LoRA (r 16, alpha 32, every linear layer), batch, steps,
learning rate and seed, each run a fresh process:

- ``plain trl``: a script a user would write: from_pretrained, peft's LoraConfig, trl's
  SFTConfig + SFTTrainer, train(); with the same packing and gradient checkpointing as the lorad
  run it is compared with, and once more without checkpointing (the memory baseline);
- ``lorad``: ``python -m lorad.training.worker JOB_DIR`` with lorad's defaults (packing "auto",
  liger_kernel "auto", gradient checkpointing on CUDA, completion-only LM head), quantization
  "none" (bf16); then one setting changed at a time: Liger off/on, packing off, gradient
  checkpointing off, 4-bit QLoRA (bitsandbytes).

tokens/s counts the non-padding tokens trained over the wall time of the training loop (model
load, tokenization and saving excluded, the first steps included). Peak memory is
``torch.cuda.max_memory_allocated()`` of the training process (resident set on the CPU).

MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s (989 TFLOP/s for an H100 or
H200 SXM; ``--peak-tflops`` otherwise). Model FLOPs per trained token, for LoRA:

    4 * N_matmul            2N forward + 2N backward: the frozen base gets input gradients only,
                            no weight gradients (N_matmul = every Linear weight, the LM head included,
                            embeddings excluded)
  + 6 * N_lora              the adapters' own forward, input and weight gradients
  + 12 * L * d_attn * c     attention scores and values (QK^T and AV, 2 FLOPs per multiply-add,
                            forward x3 for the backward), d_attn = heads * head_dim, c = the mean
                            number of earlier tokens a token attends to within its own row
                            (causal: (len + 1) / 2 averaged over the rows' tokens)

Recomputation under gradient checkpointing is not counted (it is not model work), so
checkpointing lowers MFU. At the end: the lorad run's health check, and its adapter loaded with
``PeftModel.from_pretrained`` onto the base giving finite logits.

    PYTHONPATH=src python bench/gpu.py                # on the GPU machine (see bench/README.md)
    PYTHONPATH=src python bench/gpu.py --tiny         # CPU, tiny models, CUDA-only rows skipped
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODEL_DIR_FILE = "bench-model-dir.txt"
GiB = 2**30

# Llama-architecture shapes (those of Qwen2.5-0.5B and -1.5B: grouped-query attention, a tied
# 151,936-entry vocabulary), random weights.
MODELS = {
    "0.5B": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5B": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
# --tiny: one model standing in for both, with the whole matrix (the test's mode, on a CPU).
TINY_MODELS = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0}


# -- model and rows ---------------------------------------------------------------------------


def build_model(directory: Path, shape: dict, cuda: bool) -> Path:
    """A random-weight Llama of ``shape`` with lorad's tiny ChatML tokenizer, saved to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorad.training.tiny import train_tokenizer

    tokenizer = train_tokenizer(512)
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # why: building a 1.5B model in fp32 first would double the time
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


def rows(n: int, seq: int, seed: int = 0) -> list[dict]:
    """Mixed-length SFT rows: a prompt with earlier attempts, answers from a few lines to most of ``seq``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        history = " ".join(f"attempt{rng.randint(0, 99)} failed" for _ in range(rng.randint(1, seq // 64)))
        lines = rng.choice([2, 4, 8, 16, 32, 48, 64])
        lines = max(1, min(lines, seq // 16))
        body = "\n".join(f"    x{j} = x{j - 1} + {rng.randint(0, 99)}" if j else "    x0 = n" for j in range(lines))
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Write f{i}(n). {history}"}],
                "completion": [{"role": "assistant", "content": f"def f{i}(n):\n{body}\n    return x{lines - 1}"}],
            }
        )
    return out


# -- the plain trl script ---------------------------------------------------------------------


def baseline(job_dir: str, packing: bool, checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(Path(job_dir, "job.json").read_text())
    model_dir = (Path(job_dir) / MODEL_DIR_FILE).read_text()
    data = [json.loads(line) for line in Path(job_dir, "train.jsonl").read_text().splitlines()]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    peft_config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=spec["max_steps"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        max_length=spec["max_seq_length"],
        seed=spec["seed"],
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda,
        packing=packing,
        gradient_checkpointing=checkpointing,
        include_num_input_tokens_seen="non_padding",
        logging_steps=1,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "peak": _peak(cuda)}


def _peak(cuda: bool) -> int:
    import resource

    import torch

    if cuda:
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _env() -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def run_baseline(job_dir: Path, *, packing: bool, checkpointing: bool) -> dict:
    argv = [sys.executable, str(HERE), "--baseline-job", str(job_dir)]
    argv += (["--packing"] if packing else []) + (["--checkpointing"] if checkpointing else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- lorad ------------------------------------------------------------------------------------


def make_job(
    root: Path, name: str, model_dir: Path, data: list[dict], *, steps: int, batch: int, seq: int, **training
) -> Path:
    from lorad.config import EvaluationSettings, TrainingSettings
    from lorad.training.jobdir import build_spec, write_job

    settings = TrainingSettings(
        base_model=str(model_dir),
        max_steps=steps,
        batch_size=batch,
        max_seq_length=seq,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        learning_rate=2e-4,
        save_steps=steps * 10,
        **training,
    )
    spec = build_spec(name, root / "state", settings, EvaluationSettings(eval_batch_size=4), evaluate=False)
    job_dir = write_job(root / name, spec, data, data[:4])
    (job_dir / MODEL_DIR_FILE).write_text(str(model_dir))
    return job_dir


def run_lorad(job_dir: Path) -> dict:
    from lorad.training.jobdir import read_job, read_result, worker_command

    proc = subprocess.run(worker_command(job_dir, read_job(job_dir)), capture_output=True, text=True, env=_env())
    result = read_result(job_dir)
    if proc.returncode != 0 or result is None or not result.succeeded:
        why = (result.error or result.reason) if result else proc.stderr.strip()[-1500:]
        return {"error": why}
    return {
        "tokens": result.tokens,
        "seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "peak": result.peak_memory_bytes,
        "speed": result.speed,
        "health": result.health,
        "adapter": result.adapter,
    }


# -- figures ----------------------------------------------------------------------------------


def flops_per_token(model_dir: Path, data: list[dict], seq: int, lora_r: int) -> tuple[float, float]:
    """(model FLOPs per trained token by the module docstring's formula, the mean attended context)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_matmul = n_lora = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n_matmul += module.in_features * module.out_features
            if module is not model.get_output_embeddings():
                n_lora += lora_r * (module.in_features + module.out_features)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [
        min(
            seq,
            len(
                tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=True)[
                    "input_ids"
                ]
            ),
        )
        for r in data
    ]
    # Mean attended context per token within its row: sum over rows of len(len+1)/2, over the tokens.
    context = sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    return 4 * n_matmul + 6 * n_lora + 12 * config.num_hidden_layers * d_attn * context, context


def check_adapter(model_dir: Path, adapter: str, cuda: bool) -> str:
    """Load the base and the adapter as a user would; the logits on a prompt must be finite."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = PeftModel.from_pretrained(base.to("cuda" if cuda else "cpu"), adapter)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write add(a, b)."}],
        tokenize=True,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in ids.items()}).logits
    finite = bool(torch.isfinite(logits).all())
    return f"adapter {adapter} loads with PeftModel.from_pretrained: {'finite' if finite else 'NON-FINITE'} logits"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (the test's mode)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    p.add_argument("--keep", action="store_true", help="keep the models and job directories")
    p.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    p.add_argument("--baseline-job", help=argparse.SUPPRESS)
    p.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_job:
        print(json.dumps(baseline(args.baseline_job, args.packing, args.checkpointing)))
        return 0

    import torch

    from lorad.training import resources, speed

    started = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny on a CPU (the full benchmark needs a GPU)")
        return 2
    models = TINY_MODELS if args.tiny else MODELS
    steps = args.steps or (3 if args.tiny else 20)
    batch = args.batch or (2 if args.tiny else 8)
    seq = args.seq or (128 if args.tiny else 1024)
    device = resources.detect_device()
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device.name), None)
    bnb = resources.bitsandbytes_available()
    liger = speed.liger_available()
    root = Path(tempfile.mkdtemp(prefix="lorad-bench-gpu-"))
    print(
        f"device: {device.name} ({device.kind}); {'bf16' if cuda else 'fp32'}, seq {seq}, batch {batch}, "
        f"{steps} steps, LoRA r 16 on every linear layer; liger-kernel {'installed' if liger else 'absent'}, "
        f"bitsandbytes {'installed' if bnb else 'absent'}; peak {peak_tflops or 'unknown'} TFLOP/s"
    )
    table: list[dict] = []
    skipped: list[str] = []
    last_lorad: tuple[Path, dict] | None = None
    for size, shape in models.items():
        model_dir = build_model(root / f"model-{size}", shape, cuda)
        data = rows(batch * steps * 2, seq)
        fpt, context = flops_per_token(model_dir, data, seq, lora_r=16)
        print(f"{size}: {fpt / 1e9:.2f} GFLOP per trained token (mean attended context {context:.0f} tokens)")
        params = _parameters(model_dir)
        full = size == list(models)[-1]  # the whole matrix on the larger model, the headline pair on the other
        runs: list[tuple[str, dict | None, dict]] = [
            ("plain trl (same settings)", None, {"packing": True, "checkpointing": cuda}),
            ("lorad (defaults)", {}, {}),
        ]
        if full:
            runs += [("plain trl, no checkpointing", None, {"packing": True, "checkpointing": False})]
            if cuda and liger:
                runs += [("lorad, liger off", {"liger_kernel": False}, {})]
            else:
                skipped.append(f"{size} liger on/off: {'needs CUDA' if not cuda else 'liger-kernel not installed'}")
            runs += [("lorad, packing off", {"packing": False}, {})]
            if cuda:
                runs += [("lorad, checkpointing off", {"gradient_checkpointing": False}, {})]
            else:
                skipped.append(
                    f"{size} checkpointing off: on the CPU lorad checkpoints only a run that would not "
                    f"fit otherwise, so the default row is already without it"
                )
            if cuda and bnb:
                runs += [("lorad, 4-bit QLoRA", {"quantization": "4bit"}, {})]
            else:
                skipped.append(f"{size} 4-bit QLoRA: {'needs CUDA' if not cuda else 'bitsandbytes not installed'}")
        plain = None
        for i, (label, lorad_settings, base_settings) in enumerate(runs):
            if lorad_settings is None:
                job = make_job(root, f"{size}-{i}", model_dir, data, steps=steps, batch=batch, seq=seq)
                out = run_baseline(job, **base_settings)
            else:
                job = make_job(
                    root,
                    f"{size}-{i}",
                    model_dir,
                    data,
                    steps=steps,
                    batch=batch,
                    seq=seq,
                    quantization="none",
                    **lorad_settings,
                )
                out = run_lorad(job)
                if "error" not in out and not lorad_settings:
                    last_lorad = (model_dir, out)
            if label.startswith("plain trl (same"):
                plain = out
            row = {"model": size, "parameters": params, "run": label, **out}
            if "error" not in out:
                row["mfu"] = (fpt * out["tokens_per_s"] / (peak_tflops * 1e12)) if peak_tflops else None
                if plain and "error" not in plain:
                    row["vs_plain"] = out["tokens_per_s"] / plain["tokens_per_s"]
                    row["memory_vs_plain"] = out["peak"] / plain["peak"]
            table.append(row)
            if not args.keep and not (last_lorad and last_lorad[1] is out):  # that adapter is loaded at the end
                shutil.rmtree(job, ignore_errors=True)
    health = adapter = "no successful lorad run"
    if last_lorad:
        model_dir, out = last_lorad
        health = f"health check: {'ok' if out['health']['ok'] else 'FAILED'} ({out['health']['reason']})"
        adapter = check_adapter(model_dir, out["adapter"], cuda)
    print_table(table, peak_tflops, cuda)
    for line in targets(table, list(models)[-1]):
        print(line)
    for line in skipped:
        print(f"skipped: {line}")
    print(health)
    print(adapter)
    wall = time.monotonic() - started
    print(f"wall time {wall:.0f} s" + ("" if args.tiny else f" (target < 300 s: {'met' if wall < 300 else 'MISSED'})"))
    if args.json:
        print(json.dumps(table))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    ok = all("error" not in r for r in table) and last_lorad is not None and "finite logits" in adapter
    return 0 if ok else 1


def targets(table: list[dict], large: str) -> list[str]:
    """The issue's targets, each judged on this run's rows."""

    def row(model, run):
        return next((r for r in table if r["model"] == model and r["run"] == run and "error" not in r), None)

    lines = []
    for model in dict.fromkeys(r["model"] for r in table):
        lorad = row(model, "lorad (defaults)")
        if lorad and "vs_plain" in lorad:
            ok = lorad["vs_plain"] >= 0.95
            lines.append(
                f"target {model}: lorad / plain trl tokens/s = {lorad['vs_plain']:.2f} (>= 0.95: "
                f"{'met' if ok else 'MISSED'})"
            )
    lorad, plain = row(large, "lorad (defaults)"), row(large, "plain trl, no checkpointing")
    if lorad and lorad.get("mfu") is not None:
        lines.append(
            f"target {large}: MFU with packing = {lorad['mfu']:.1%} (>= 35%: "
            f"{'met' if lorad['mfu'] >= 0.35 else 'MISSED'})"
        )
    if lorad and plain:
        ratio = lorad["peak"] / plain["peak"]
        lines.append(
            f"target {large}: peak memory, lorad (liger {lorad['speed'].get('liger_kernel')}, checkpointing "
            f"{lorad['speed'].get('gradient_checkpointing')}) / plain trl without checkpointing = "
            f"{ratio:.2f} (<= 0.5: {'met' if ratio <= 0.5 else 'MISSED'})"
        )
    return lines


def _parameters(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def print_table(table: list[dict], peak_tflops: float | None, cuda: bool) -> None:
    memory = "peak GPU GiB" if cuda else "peak RSS GiB"
    print(f"| model | run | tokens/s | vs plain trl | {memory} | memory vs plain | MFU | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        name = (
            f"{r['model']} ({r['parameters'] / 1e9:.2f}B)"
            if r["parameters"] >= 1e8
            else f"{r['model']} ({r['parameters'] / 1e6:.1f}M)"
        )
        if "error" in r:
            print(f"| {name} | {r['run']} | failed |  |  |  |  | {r['error'].splitlines()[-1][:160]} |")
            continue
        s = r.get("speed") or {}
        notes = ", ".join(
            f"{k}={s[k]}" for k in ("packing", "liger_kernel", "gradient_checkpointing", "completion_head") if k in s
        )
        vs = f"{r['vs_plain']:.2f}" if "vs_plain" in r else ""
        mem_vs = f"{r['memory_vs_plain']:.2f}" if "memory_vs_plain" in r else ""
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        print(
            f"| {name} | {r['run']} | {r['tokens_per_s']:,.0f} | {vs} | {r['peak'] / GiB:.2f} | {mem_vs} | {mfu} "
            f"| {notes} |"
        )
    if peak_tflops is None:
        print("MFU: n/a (unknown device peak; pass --peak-tflops)")


if __name__ == "__main__":
    sys.exit(main())
