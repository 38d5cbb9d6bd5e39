"""GRPO with the guard as the reward: what the worker adds to trl's GRPOTrainer.

- :class:`GuardReward` judges each sampled completion with the configured guard command,
  under the contract evaluation uses (:func:`lorad.evaluation.metrics.run_guard`: the first
  fenced code block, or the whole answer, on stdin; the specification in
  ``$LORAD_SPECIFICATION``; exit 0 = 1.0, anything else or a timeout = 0.0). The guards of
  one batch run concurrently, one subprocess per completion, in a thread pool.
- :func:`stop_after_first_block` makes sampling end a completion once its first fenced code
  block is closed. Why: a small model keeps writing prose after the code; measured on
  SmolLM2-135M, 75% of completions ran to the length cap, which costs generation time and
  puts the prose into the policy gradient, while the guard only ever reads the block.

Imported by the worker only; torch and transformers are imported inside.
"""

from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor

from lorad.evaluation.metrics import extract_code, first_block_closer, run_guard


def completion_text(completion) -> str:
    """A trl completion (conversational: a list of messages; or a plain string) as text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


class GuardReward:
    """trl reward function: 1.0 for each completion the guard accepts, else 0.0.

    Args:
        command: the guard's argv (evaluation.guard_command).
        timeout: seconds per guard run (evaluation.guard_timeout); a timeout scores 0.0.
        workers: guard subprocesses at once (default: the CPUs, 2 to 8).
    """

    __name__ = "guard"  # what trl logs the reward under (rewards/guard/mean)

    def __init__(self, command, timeout: float, workers: int | None = None):
        if not command:
            raise ValueError("GRPO needs a guard command: the guard's verdict is the reward")
        self.command = list(command)
        self.timeout = timeout
        self.workers = workers or min(8, max(2, os.cpu_count() or 2))

    def __call__(self, prompts, completions, specification, **_) -> list[float]:
        texts = [completion_text(c) for c in completions]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            verdicts = pool.map(
                lambda pair: run_guard(self.command, extract_code(pair[0]), pair[1], self.timeout),
                zip(texts, specification, strict=True),
            )
            return [1.0 if ok else 0.0 for ok, _ in verdicts]


@contextlib.contextmanager
def stop_after_first_block(model, tokenizer):
    """For the duration, ``model.generate`` ends each sequence once its first code block is
    closed (the closing fence, then end-of-sequence), so the completion trl trains on is the
    code the guard judged. trl's GRPOTrainer calls ``generate`` on this same model object.
    """
    from transformers import LogitsProcessorList

    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        if ids is not None:
            processors.append(first_block_closer(tokenizer, ids.shape[1]))
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate  # an instance attribute shadows the method
    try:
        yield model
    finally:
        del model.generate
