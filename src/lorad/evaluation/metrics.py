"""Held-out metrics, computed inside the training worker (the base model is loaded once).

Every model compared in one run — the candidate, the adapter serving now, or the bare base
model — is scored on the same frozen held-out tasks with the same batching:

- **loss**: mean negative log-likelihood per token of the accepted completion given the
  first-attempt prompt (and its perplexity), over the tasks that have an accepted answer,
  tokenised with the tokenizer's chat template exactly as trl tokenises a conversational
  prompt-completion row, loss on completion tokens only;
- **first-attempt acceptance ε** (when a guard command is configured): a greedy answer to
  the first-attempt prompt of every held-out task (first-try, refined and exhausted alike)
  is generated with each model (batched, left padding), each answer is piped to the guard
  command (the specification in ``$LORAD_SPECIFICATION``; exit 0 = accepted, stdout =
  feedback, a timeout = rejected), and ε is the share accepted. The per-task outcomes
  (``guard``: task key, chain, accepted, feedback) are kept, so the gate can pair them.
  Guard commands run in parallel.

Only the worker imports this module; torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lorad.config import EvaluationSettings

# Feedback kept per guard run in the metrics (the full text is not needed to decide).
FEEDBACK_CHARS = 2000
# The head of the specification kept per guard run, to name the task where outcomes are shown.
TASK_CHARS = 100

_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CLOSED_BLOCK = re.compile(r"```[^\n`]*\n.*?```", re.DOTALL)


def evaluate(
    model,
    tokenizer,
    heldout_rows: list[dict],
    *,
    adapters: dict[str, str | None],
    batch_size: int,
    max_seq_length: int,
    guard_command: list[str] | tuple = (),
    guard_timeout: float = EvaluationSettings.guard_timeout,
    max_new_tokens: int = EvaluationSettings.max_new_tokens,
) -> dict[str, dict]:
    """Score several adapters of one model on the same held-out rows.

    Args:
        model: a peft ``PeftModel`` holding every named adapter (or a plain model when every
            value of ``adapters`` is None).
        tokenizer: its tokenizer, with a chat template.
        heldout_rows: ``{"prompt": [msgs], "completion": [assistant msg] or None, "specification":
            str, "chain_id": str, "task_key": str}`` each, one per task; the loss is scored on
            those with a completion, every one is generated for when guarded.
        adapters: label -> adapter name loaded in ``model``; None = the bare base model.
        batch_size: examples per forward pass (the same for every model).
        max_seq_length: sequences are cut to this many tokens (the end of the answer goes).
        guard_command: argv of the guard; empty = loss only.
        guard_timeout: seconds before a guard run counts as rejected.
        max_new_tokens: generation budget per answer.

    Returns:
        label -> ``{"nll", "perplexity", "tokens", "examples"}`` plus, when guarded,
        ``{"epsilon", "accepted", "generated", "guard": [{chain_id, accepted, feedback}]}``.
    """
    encoded = [encode_example(tokenizer, row, max_seq_length) for row in heldout_rows if row.get("completion")]
    samples = heldout_rows if guard_command else []
    results: dict[str, dict] = {}
    for label, adapter in adapters.items():
        with _active(model, adapter):
            metrics = score_loss(model, tokenizer, encoded, batch_size)
            if samples:
                answers = generate(
                    model,
                    tokenizer,
                    [row["prompt"] for row in samples],
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                    max_seq_length=max_seq_length,
                )
                metrics |= guard_answers(samples, answers, guard_command, guard_timeout)
        results[label] = metrics
    return results


@contextlib.contextmanager
def _active(model, adapter: str | None):
    """Make ``adapter`` the one in use for the duration; None = the base model alone."""
    if adapter is None:
        disable = getattr(model, "disable_adapter", None)
        with disable() if disable is not None else contextlib.nullcontext():
            yield
    else:
        model.set_adapter(adapter)
        yield


def encode_example(tokenizer, row: dict, max_seq_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and where the completion starts (as trl does it)."""
    prompt_ids = _chat_ids(tokenizer, row["prompt"], add_generation_prompt=True)
    full_ids = _chat_ids(tokenizer, row["prompt"] + row["completion"])
    start = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):  # the common prefix
        if a != b:
            break
        start += 1
    return full_ids[:max_seq_length], start


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def score_loss(model, tokenizer, encoded: list[tuple[list[int], int]], batch_size: int) -> dict:
    """Mean per-token NLL of the completions; examples cut before their answer count for nothing."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    total, tokens, examples = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i : i + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for j, (ids, start) in enumerate(batch):
                input_ids[j, : len(ids)] = torch.tensor(ids)
                attention[j, : len(ids)] = 1
                labels[j, start : len(ids)] = torch.tensor(ids[start:], dtype=torch.long)
            # Position t predicts token t+1, so only positions from the earliest answer's start
            # on need the LM head: over a 49k vocabulary the prompts' logits were most of
            # evaluation's memory (6.2 GB for 8 SmolLM2 rows, above training's peak).
            first = max(min(start for _, start in batch) - 1, 0)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=width - first
            ).logits  # positions first .. width-1
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, first + 1 :].to(device)
            nll = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(shift_labels.shape)
            counted = shift_labels != -100
            total += float(nll[counted].sum())
            tokens += int(counted.sum())
            examples += int(counted.any(dim=1).sum())
    if not tokens:
        return {"nll": float("nan"), "perplexity": float("nan"), "tokens": 0, "examples": 0}
    mean = total / tokens
    perplexity = math.exp(mean) if mean < 700 else float("inf")
    return {"nll": mean, "perplexity": perplexity, "tokens": tokens, "examples": examples}


def generate(
    model, tokenizer, prompts: list[list[dict]], *, batch_size: int, max_new_tokens: int, max_seq_length: int
) -> list[str]:
    """Greedy first-attempt answers, batched with left padding (so all rows end together)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers: list[str] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids = [
                _chat_ids(tokenizer, p, add_generation_prompt=True)[-max_seq_length:]
                for p in prompts[i : i + batch_size]
            ]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            attention = torch.zeros((len(ids), width), dtype=torch.long)
            for j, x in enumerate(ids):
                input_ids[j, width - len(x) :] = torch.tensor(x)
                attention[j, width - len(x) :] = 1
            # The guard reads the first fenced block only: a row ends once it has closed one
            # (SmolLM2 writes prose after its code, to the token budget, in most answers).
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                logits_processor=[first_block_closer(tokenizer, width)],
            )
            for row in out[:, width:]:
                answers.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return answers


def closes_first_block(text: str) -> bool:
    """The text holds a fenced code block that has been closed."""
    return _CLOSED_BLOCK.search(text) is not None


def first_block_closer(tokenizer, prompt_length: int):
    """A logits processor that forces end-of-sequence in every row whose completion (the
    tokens after ``prompt_length``) has closed its first fenced code block."""
    import torch
    from transformers import LogitsProcessor

    eos = tokenizer.eos_token_id

    class CloseFirstBlock(LogitsProcessor):
        def __init__(self):
            self.closed: set[int] = set()

        def __call__(self, input_ids, scores):
            for row in range(input_ids.shape[0]):
                if row not in self.closed:
                    last = tokenizer.decode(input_ids[row, -1:].tolist())
                    # Why decode the whole completion only after a backtick: it is the only
                    # token that can close a block, and decoding every row each step is slow.
                    if "`" in last and closes_first_block(
                        tokenizer.decode(input_ids[row, prompt_length:].tolist(), skip_special_tokens=True)
                    ):
                        self.closed.add(row)
                if row in self.closed:
                    scores[row] = torch.full_like(scores[row], float("-inf"))
                    scores[row, eos] = 0.0
            return scores

    return CloseFirstBlock()


def extract_code(answer: str) -> str:
    """The artifact to guard: the first fenced code block if the answer has one, else the answer."""
    m = _FENCE.search(answer)
    return (m.group(1) if m else answer).strip("\n") + "\n"


def run_guard(command: list[str] | tuple, artifact: str, specification: str, timeout: float) -> tuple[bool, str]:
    """Run the guard once: artifact on stdin, specification in $LORAD_SPECIFICATION.

    Returns:
        (accepted, feedback): exit 0 = accepted; feedback is stdout (stderr when stdout is
        empty). A timeout, or a command that cannot start, counts as rejected.
    """
    env = dict(os.environ, LORAD_SPECIFICATION=specification)
    try:
        proc = subprocess.run(list(command), input=artifact, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"guard timed out after {timeout:g}s"
    except OSError as e:
        return False, f"guard could not run: {e}"
    feedback = proc.stdout.strip() or proc.stderr.strip()
    return proc.returncode == 0, feedback[:FEEDBACK_CHARS]


def guard_answers(
    rows: list[dict], answers: list[str], command, timeout: float, workers: int | None = None
) -> dict[str, Any]:
    """Guard every answer in parallel; ε = accepted / generated."""
    workers = workers or min(8, max(2, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = list(
            pool.map(
                lambda pair: run_guard(command, extract_code(pair[1]), pair[0].get("specification", ""), timeout),
                zip(rows, answers, strict=True),
            )
        )
    accepted = sum(ok for ok, _ in verdicts)
    return {
        "epsilon": accepted / len(answers) if answers else float("nan"),
        "accepted": accepted,
        "generated": len(answers),
        "guard": [
            {
                "task_key": row.get("task_key") or row.get("chain_id"),
                "chain_id": row.get("chain_id"),
                "task": (row.get("specification") or "")[:TASK_CHARS],
                "accepted": ok,
                "feedback": fb,
            }
            for row, (ok, fb) in zip(rows, verdicts, strict=True)
        ],
    }
