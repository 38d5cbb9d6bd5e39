"""Chains -> chat messages, as the generator saw its task.

The conditioning format:

- system: the role text (from a prompts.json template entry, when one is configured) and the
  task's constraints; left out when both are empty;
- user: the specification, then, when the chain had rejected attempts, a section
  "Previous attempts and feedback" with the last ``max_history`` of them (each cut to
  ``max_artifact_chars``) and the guard's feedback on each;
- assistant: the accepted artifact.

The first-attempt variant (no history) is what the generator sees before any feedback, and
what first-attempt acceptance ε measures; the held-out set, DPO and KTO use it. SFT rows and
the chat/alpaca export follow ``[selection] conditioning`` (:func:`conditionings`): a
refinement gives a first-attempt row, a history row, or both. Everything here is pure over
chain rows.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorad.buffer.traces import Chain, target

HISTORY_HEADING = "Previous attempts and feedback"
FIRST_ATTEMPT = "first_attempt"  # the specification alone -> the accepted answer
HISTORY = "history"  # the specification, the rejected attempts and their feedback -> the accepted answer
BOTH = "both"
CONDITIONINGS = (BOTH, FIRST_ATTEMPT, HISTORY)


class TemplateError(ValueError):
    "A --prompt-template / selection.prompt_template reference cannot be used."


def load_role(reference: str) -> str:
    """The role text of a prompts.json entry named as ``FILE:KEY`` ("" for an empty reference).

    An entry is either a string (the role itself) or an object with a ``role`` string, as
    AtomicGuard's prompt templates carry it.

    Raises:
        TemplateError: the file cannot be read, is not JSON, or has no such entry.
    """
    if not reference:
        return ""
    path, sep, key = reference.rpartition(":")
    if not sep or not path or not key:
        raise TemplateError(f"prompt template must look like FILE:KEY (prompts.json:g_coder), got {reference!r}")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TemplateError(f"cannot read prompt template {path}: {e.strerror}") from None
    except ValueError as e:
        raise TemplateError(f"prompt template {path} is not JSON: {e}") from None
    entry = data.get(key) if isinstance(data, dict) else None
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("role"), str):
        return entry["role"]
    keys = ", ".join(sorted(data)) if isinstance(data, dict) else "none"
    raise TemplateError(f"prompt template {path} has no entry {key!r} with a role (entries: {keys})")


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... {len(text) - limit} more characters cut]"


def feedback_for(chain: Chain, row: dict) -> str:
    """The guard's feedback on one attempt: its own, else as a later attempt's history records it."""
    if row.get("feedback"):
        return row["feedback"]
    for later in chain.rows:
        for entry in json.loads(later.get("feedback_history") or "[]"):
            if entry.get("artifact_id") == row.get("artifact_id") and entry.get("feedback"):
                return entry["feedback"]
    return ""


def history_text(chain: Chain, max_history: int, max_artifact_chars: int) -> str:
    """The "Previous attempts and feedback" section body ("" when there is nothing to show)."""
    rejected = chain.rejected_before
    shown = rejected[-max_history:] if max_history > 0 else ()
    parts = []
    first = len(rejected) - len(shown) + 1
    for k, row in enumerate(shown, start=first):
        feedback = truncate(feedback_for(chain, row), max_artifact_chars) or "(no feedback recorded)"
        parts.append(f"Attempt {k}:\n```\n{truncate(row['content'], max_artifact_chars)}\n```\n"
                     f"Feedback: {feedback}")
    return "\n\n".join(parts)


def system_text(chain: Chain, role: str = "") -> str:
    row = target(chain) or {}
    constraints = row.get("constraints") or next((r["constraints"] for r in chain.rows if r.get("constraints")), "")
    return "\n\n".join(p for p in (role.strip(), (constraints or "").strip()) if p)


def prompt(chain: Chain, *, history: bool = True, max_history: int = 3, max_artifact_chars: int = 4000,
           role: str = "") -> list[dict]:
    """The prompt messages (system?, user); ``history=False`` gives the first-attempt prompt."""
    messages = []
    system = system_text(chain, role)
    if system:
        messages.append({"role": "system", "content": system})
    user = chain.specification
    past = history_text(chain, max_history, max_artifact_chars) if history else ""
    if past:
        user = f"{user}\n\n{HISTORY_HEADING}:\n\n{past}"
    messages.append({"role": "user", "content": user})
    return messages


def conditionings(chain: Chain, conditioning: str, max_history: int) -> tuple[str, ...]:
    """The prompts a chain's accepted answer is trained under: FIRST_ATTEMPT and/or HISTORY.

    A chain with no history to show (a first-try success, or ``max_history`` 0) has one
    prompt whatever the setting, and gives one row, named FIRST_ATTEMPT.

    Raises:
        ValueError: ``conditioning`` is not one of CONDITIONINGS.
    """
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {', '.join(CONDITIONINGS)}")
    if not (chain.rejected_before and max_history > 0):
        return (FIRST_ATTEMPT,)
    return (FIRST_ATTEMPT, HISTORY) if conditioning == BOTH else (conditioning,)


def answer(row: dict) -> list[dict]:
    return [{"role": "assistant", "content": row["content"]}]


def chat(chain: Chain, *, history: bool = True, max_history: int = 3, max_artifact_chars: int = 4000,
         role: str = "") -> list[dict]:
    """The whole conversation: prompt messages, then the accepted artifact as the assistant."""
    if chain.accepted is None:
        raise ValueError(f"chain {chain.chain_id} has no accepted attempt")
    return prompt(chain, history=history, max_history=max_history, max_artifact_chars=max_artifact_chars,
                  role=role) + answer(chain.accepted)


def dpo_pairs(chain: Chain, *, role: str = "") -> list[tuple[list, list, list, dict]]:
    """(prompt, chosen, rejected, rejected row) for each rejected attempt before the accepted one.

    The prompt is the first-attempt prompt: the pair teaches which answer to give up front.
    """
    if chain.accepted is None:
        return []
    first = prompt(chain, history=False, role=role)
    return [(first, answer(chain.accepted), answer(row), row) for row in chain.rejected_before]


def kto_rows(chain: Chain, *, role: str = "") -> list[tuple[list, list, bool, dict]]:
    """(prompt, completion, desirable, row): the accepted attempt and every rejected one.

    Chains that never succeeded give only undesirable rows.
    """
    first = prompt(chain, history=False, role=role)
    out = [(first, answer(row), False, row) for row in chain.rejected_before]
    if chain.accepted is not None:
        out.append((first, answer(chain.accepted), True, chain.accepted))
    return out
