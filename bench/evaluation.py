"""Held-out evaluation cost: batched greedy generation and parallel guards, each against the
one-at-a-time baseline measured in the same run.

- generation: 32 held-out prompts, left-padded batches of `--batch` vs one prompt at a time
  (same greedy answers; the script checks);
- guards: the fixture store's test guard (a Python subprocess per answer) on 32 answers, run
  in parallel vs one after another;
- loss: held-out NLL for 32 examples, batched vs one at a time.

The model is the tiny in-process Llama by default (hidden 64), or SmolLM2-135M with --smollm2.

    .venv/bin/python bench/evaluation.py [--batch 8] [--samples 32] [--new-tokens 32] [--smollm2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUARD = ROOT / "tests" / "fixtures" / "task_guard.py"

SPECS = [
    "Write a Python function `add_{n}(x)` that returns x plus {n}.",
    "Write a Python function `times_{n}(x)` that returns x multiplied by {n}.",
    "Write a Python function `repeat_{n}(s)` that returns the string s repeated {n} times.",
    "Write a Python function `sum_first_{n}(xs)` that returns the sum of the first {n} items of the list xs.",
]


def rows(k: int) -> list[dict]:
    out = []
    for i in range(k):
        spec = SPECS[i % len(SPECS)].format(n=i + 2)
        name = spec.split("`")[1].split("(")[0]
        out.append(
            {
                "prompt": [
                    {"role": "system", "content": "Return only Python code."},
                    {"role": "user", "content": spec},
                ],
                "completion": [{"role": "assistant", "content": f"def {name}(x):\n    return x\n"}],
                "specification": spec,
                "chain_id": f"c{i}",
            }
        )
    return out


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorad.evaluation import metrics

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smollm2:
            from lorad.training.base_model import resolve, smollm2_gguf

            path = resolve(str(smollm2_gguf()), tmp)
            label = "SmolLM2-135M-Instruct"
        else:
            from lorad.training.tiny import build_tiny_model

            path = build_tiny_model(Path(tmp) / "tiny", hidden_size=64)
            label = "tiny Llama (hidden 64, 2 layers)"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        model.eval()
        data = rows(args.samples)
        prompts = [r["prompt"] for r in data]
        print(
            f"model: {label}; {args.samples} prompts, {args.new_tokens} new tokens, batch {args.batch}, "
            f"{args.threads} thread(s)"
        )

        batched, t_batched = timed(
            lambda: metrics.generate(
                model, tok, prompts, batch_size=args.batch, max_new_tokens=args.new_tokens, max_seq_length=512
            )
        )
        single, t_single = timed(
            lambda: metrics.generate(
                model, tok, prompts, batch_size=1, max_new_tokens=args.new_tokens, max_seq_length=512
            )
        )
        same = sum(a == b for a, b in zip(batched, single, strict=True))
        print(
            f"generation  one at a time {t_single:7.2f} s   batched {t_batched:7.2f} s   "
            f"speed-up x{t_single / t_batched:.2f}   identical answers {same}/{len(prompts)}"
        )

        encoded = [metrics.encode_example(tok, r, 512) for r in data]
        (_, t_loss_b) = timed(lambda: metrics.score_loss(model, tok, encoded, args.batch))
        (_, t_loss_1) = timed(lambda: metrics.score_loss(model, tok, encoded, 1))
        print(
            f"loss        one at a time {t_loss_1:7.2f} s   batched {t_loss_b:7.2f} s   "
            f"speed-up x{t_loss_1 / t_loss_b:.2f}"
        )

        guard = [sys.executable, str(GUARD)]
        answers = [r["completion"][0]["content"] for r in data]
        par, t_par = timed(lambda: metrics.guard_answers(data, answers, guard, 30))
        seq, t_seq = timed(lambda: metrics.guard_answers(data, answers, guard, 30, workers=1))
        assert par["accepted"] == seq["accepted"]
        print(
            f"guards      one at a time {t_seq:7.2f} s   parallel {t_par:7.2f} s   "
            f"speed-up x{t_seq / t_par:.2f}   (ε = {par['epsilon']:.2f} on placeholder answers)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
