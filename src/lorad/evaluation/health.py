"""The health check a freshly trained adapter must pass before it is saved.

A forward pass over one held-out batch (prompt + accepted completion, formatted with the
model's chat template) must give finite logits everywhere. A NaN or Inf loss during training
fails the job earlier, in the worker; this catches weights that went bad without the loss
showing it (an overflow in a layer the loss never reached, say). Runs inside the worker.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str
    examples: int


def check_finite_logits(model, tokenizer, rows: list[dict], *, batch_size: int, max_seq_length: int) -> Health:
    """Forward ``batch_size`` held-out rows (``prompt`` + ``completion``) and check every logit.

    Rows without a prompt/completion pair (DPO rows use ``chosen``) fall back to that answer.
    With no rows at all a short chat is used, so a check always runs.
    """
    import torch

    batch = [_messages(r) for r in rows[:batch_size]] or [
        [
            {"role": "user", "content": "Write a function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ]
    ]
    encoded = [
        list(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])[:max_seq_length]
        for m in batch
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    finally:
        model.train(was_training)
    mask = attention.to(device).bool()
    values = logits[mask]
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        kinds = []
        if torch.isnan(values).any():
            kinds.append("NaN")
        if torch.isinf(values).any():
            kinds.append("Inf")
        return Health(
            False, f"{bad} non-finite logits ({'/'.join(kinds)}) on a held-out batch of {len(encoded)}", len(encoded)
        )
    return Health(True, "finite logits on a held-out batch", len(encoded))


def _messages(row: dict) -> list[dict]:
    answer = row.get("completion") or row.get("chosen") or []
    return list(row.get("prompt") or []) + list(answer)
