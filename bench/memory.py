"""Where a training cycle's resident memory goes, measured on a few steps (CPU).

Builds the model, adapter and trl trainer through lorad's own functions (the worker's code
path), then records the resident set (VmRSS) and its high-water mark (VmHWM, reset through
/proc/self/clear_refs before each phase) at each phase:

- python with torch/transformers/trl/peft imported;
- the base weights loaded; the LoRA attached; the trainer built;
- each training step: the peak inside the step over the RSS at its start (activations kept for
  the backward pass, the LM head's tiles, gradients and the optimizer's state on step 1),
  split at the end of the backbone's forward (a forward hook) and at the end of the loss;
- the held-out scoring and generation of the evaluation (batch ``--eval-batch``).

    .venv/bin/python bench/memory.py [--model smollm2|tiny] [--batch 4] [--seq 320] [--steps 4]
        [--no-packing] [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rows(n: int, prompt_words: int, answer_lines: int, seed: int = 0) -> list[dict]:
    """SFT rows shaped like lorad's: a long prompt (specification + earlier attempts and their
    feedback, which the loss never reads) and a shorter accepted answer."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(prompt_words // 2, prompt_words)))
        lines = rng.randint(max(1, answer_lines // 3), answer_lines)
        body = "\n".join(f"    x{j} = x{j - 1} + {rng.randint(0, 99)}" if j else "    x0 = n" for j in range(lines))
        out.append(
            {
                "prompt": [{"role": "user", "content": f"Write f{i}(n). Earlier attempts failed: {words}"}],
                "completion": [{"role": "assistant", "content": f"def f{i}(n):\n{body}\n    return x{lines - 1}"}],
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=320)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--trl-head", action="store_true", help="keep trl's LM head (every position scored)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state-dir", default=os.path.join(tempfile.gettempdir(), "lorad-bench-state"))
    args = p.parse_args()
    phases: list[tuple[str, int, int]] = []  # (phase, rss after, peak during)

    def mark(name: str) -> None:
        s = status()
        phases.append((name, s["VmRSS"], s["VmHWM"]))
        reset_peak()

    reset_peak()
    import datasets  # noqa: F401  (imported here so the phase below is the weights alone)
    import peft  # noqa: F401
    import transformers
    import trl  # noqa: F401

    from lorad.training import lora, speed

    mark("imports (torch, transformers, trl, peft, datasets)")
    if args.model == "tiny":
        from lorad.training.tiny import build_tiny_model

        model_dir = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", hidden_size=64, layers=2, vocab_size=512))
    else:
        from lorad.training.base_model import resolve, smollm2_gguf

        model_dir = resolve(str(smollm2_gguf()), args.state_dir)
    threads = speed.configure_threads()
    prec = lora.precision("cpu", "float32", args.checkpointing)
    prec = lora.Precision(prec.dtype, prec.bf16, prec.fp16, args.checkpointing, prec.use_cpu)
    model, tokenizer = lora.load_model(model_dir, prec)
    mark("base weights loaded (fp32)")
    model = lora.attach_adapter(model, r=4, alpha=8, dropout=0.05, target_modules=("all-linear",))
    mark("LoRA attached")
    packing = not args.no_packing
    data = rows(args.batch * (args.steps + 2), prompt_words=args.seq // 5, answer_lines=args.seq // 30)
    train_args = lora.training_arguments(
        "sft",
        output_dir=tempfile.mkdtemp(),
        prec=prec,
        learning_rate=2e-4,
        max_steps=args.steps,
        epochs=1.0,
        batch_size=args.batch,
        grad_accum=1,
        max_seq_length=args.seq,
        save_steps=10**6,
        seed=0,
        packing=packing,
    )
    steps: list[dict] = []

    class Probe(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.start = status()["VmRSS"]
            self.backbone = None
            reset_peak()

        def on_step_end(self, a, state, control, **kw):
            s = status()
            steps.append(
                {
                    "step": state.global_step,
                    "rss_start": self.start,
                    "peak": s["VmHWM"],
                    "backbone_forward": self.backbone,
                    "rss_end": s["VmRSS"],
                }
            )

    probe = Probe()
    trainer = lora.trainer("sft", model, tokenizer, lora.dataset(data, "sft"), train_args, [probe])
    head = speed.completion_head(trainer.model) if not args.trl_head else False
    backbone = trainer.model.get_base_model().model

    def after_backbone(module, inputs, output):
        probe.backbone = status()["VmRSS"]

    backbone.register_forward_hook(after_backbone)
    mark("trainer built (dataset tokenized)")
    t0 = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - t0
    tokens = trainer.state.num_input_tokens_seen
    mark("training")
    evaluated = {}
    if not args.no_eval:
        from lorad.evaluation.metrics import encode_example, generate, score_loss

        heldout = rows(args.eval_batch, prompt_words=args.seq // 5, answer_lines=args.seq // 30, seed=1)
        model = trainer.model
        model.eval()
        encoded = [encode_example(tokenizer, r, args.seq) for r in heldout]
        score_loss(model, tokenizer, encoded, batch_size=args.eval_batch)
        mark("held-out loss")
        generate(
            model,
            tokenizer,
            [r["prompt"] for r in heldout],
            batch_size=args.eval_batch,
            max_new_tokens=64,
            max_seq_length=args.seq,
        )
        mark("generation (64 new tokens)")
        evaluated = {"eval_batch": args.eval_batch}

    report = {
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "packing": packing,
        "checkpointing": args.checkpointing,
        "completion_head": head,
        "threads": threads,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "phases": [{"phase": n, "rss": r, "peak": h} for n, r, h in phases],
        "steps": steps,
        **evaluated,
        "process_peak": status()["VmHWM"],
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"{args.model}: batch {args.batch}, seq {args.seq}, packing {packing}, gradient checkpointing "
        f"{args.checkpointing}, completion head {head}, {threads} torch thread(s); {tokens / seconds:.0f} tokens/s"
    )
    before = 0
    for name, rss, peak in phases:
        print(
            f"  {name:52s} rss {rss / MiB:7.0f} MiB (+{(rss - before) / MiB:6.0f})  peak during {peak / MiB:7.0f} MiB"
        )
        before = rss
    for s in steps:
        bb = (s["backbone_forward"] - s["rss_start"]) / MiB if s["backbone_forward"] else float("nan")
        print(
            f"  step {s['step']}: start {s['rss_start'] / MiB:.0f} MiB, after the backbone forward +{bb:.0f} MiB, "
            f"peak +{(s['peak'] - s['rss_start']) / MiB:.0f} MiB, end {s['rss_end'] / MiB:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
