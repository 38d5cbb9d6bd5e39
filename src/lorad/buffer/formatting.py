"""Chains -> chat messages, as the generator saw its task.

Two layouts (``[selection] prompt_format``, a :class:`Template`):

- ``lorad``: system = the role text (from a prompts.json template entry, when one is
  configured) and the task's constraints, left out when both are empty; user = the
  specification, then, when the chain had rejected attempts, a section "Previous attempts and
  feedback" with the last ``max_history`` of them (each cut to ``max_artifact_chars``) and the
  guard's feedback on each; assistant = the accepted artifact;
- ``atomicguard``: the exact messages atomicguard's OpenAI-protocol generators send: their
  system message, and the user message its ``PromptTemplate.render`` makes from the template
  entry (``# ROLE``, ``# CONSTRAINTS``, ``# CONTEXT`` with the task's constraints, ``# RETRY
  HISTORY (Current Cycle)`` with each rejected attempt's feedback through ``feedback_wrapper``,
  ``# TASK``; ``{specification}``, ``{constraints}`` and ``{feedback}`` substituted as it does);
  assistant = the accepted artifact in a ```python block, as that system message asks
  (atomicguard stores the code it extracted from the block). tests/fixtures/atomicguard-prompts
  holds prompts the library itself rendered, and the tests compare.

The first-attempt variant (no history) is what the generator sees before any feedback, and
what first-attempt acceptance ε measures; the held-out set, DPO and KTO use it. SFT rows and
the chat/alpaca export follow ``[selection] conditioning`` (:func:`conditionings`): a
refinement gives a first-attempt row, a history row, or both. Everything here is pure over
chain rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lorad.buffer.traces import Chain, target

HISTORY_HEADING = "Previous attempts and feedback"
FIRST_ATTEMPT = "first_attempt"  # the specification alone -> the accepted answer
HISTORY = "history"  # the specification, the rejected attempts and their feedback -> the accepted answer
BOTH = "both"
CONDITIONINGS = (BOTH, FIRST_ATTEMPT, HISTORY)
LORAD, ATOMICGUARD = "lorad", "atomicguard"
PROMPT_FORMATS = (LORAD, ATOMICGUARD)
RETRY_HEADING = "# RETRY HISTORY (Current Cycle)"  # atomicguard's PromptTemplate section names


class TemplateError(ValueError):
    "A --prompt-template / selection.prompt_template reference cannot be used."


@dataclass(frozen=True)
class Template:
    """How a chain's prompts are laid out: lorad's own layout with an optional role, or the
    messages atomicguard's generators send (``system`` and its prompt template's sections)."""

    format: str = LORAD
    role: str = ""
    constraints: str = ""
    task: str = "{specification}"
    feedback_wrapper: str = "{feedback}"
    system: str = ""


def load_template(reference: str, prompt_format: str = LORAD, system: str = "") -> Template:
    """The Template of a prompts.json entry named as ``FILE:KEY`` in ``prompt_format``.

    Args:
        system: atomicguard's generator's system message (the ``atomicguard`` format only).

    Raises:
        TemplateError: the file cannot be read, is not JSON, has no such entry, or the
            ``atomicguard`` format has no entry or one sending its feedback as chat turns.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise TemplateError(f"unknown prompt format {prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    if prompt_format == LORAD:
        return Template(role=load_role(reference))
    if not reference:
        raise TemplateError(
            'prompt format "atomicguard" renders the generator\'s prompt template: name its '
            "prompts.json entry as FILE:KEY"
        )
    entry = _entry(reference)
    if isinstance(entry, str):
        entry = {"role": entry}
    if entry.get("feedback_mode", "inline") != "inline":
        raise TemplateError(
            f"prompt template {reference}: feedback_mode {entry['feedback_mode']!r} sends feedback "
            f'as chat turns, which lorad does not render; only "inline" is supported'
        )
    fields = {
        k: entry[k]
        for k in ("role", "constraints", "task", "feedback_wrapper")
        if isinstance(entry.get(k), str) and entry[k]
    }
    return Template(format=ATOMICGUARD, system=system, **fields)


def load_role(reference: str) -> str:
    """The role text of a prompts.json entry named as ``FILE:KEY`` ("" for an empty reference).

    An entry is either a string (the role itself) or an object with a ``role`` string, as
    AtomicGuard's prompt templates carry it.

    Raises:
        TemplateError: the file cannot be read, is not JSON, or has no such entry.
    """
    if not reference:
        return ""
    entry = _entry(reference)
    return entry if isinstance(entry, str) else entry["role"]


def template_of(selection) -> Template:
    """The Template ``[selection]`` configures (prompt_template, prompt_format, system_message)."""
    return load_template(selection.prompt_template, selection.prompt_format, selection.system_message)


def _entry(reference: str) -> str | dict:
    """A prompts.json entry: a string (the role) or an object with a ``role`` string."""
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
    if isinstance(entry, str) or (isinstance(entry, dict) and isinstance(entry.get("role"), str)):
        return entry
    keys = ", ".join(sorted(data)) if isinstance(data, dict) else "none"
    raise TemplateError(f"prompt template {path} has no entry {key!r} with a role (entries: {keys})")


_CUT_NOTE = re.compile(r"\n\[\.\.\. (\d+) more characters cut\]\Z")


def truncate(text: str, limit: int, length: int | None = None) -> str:
    """``text`` cut to ``limit`` characters, with a note of how much was left out.

    Args:
        length: the whole text's length when ``text`` holds only its first characters (read
            cut from the buffer); by default ``len(text)``. A text that already ends in this
            function's note (read cut, now cut shorter for the history) counts from the length
            the note gives, so the new note says how much of the original is missing.
    """
    if length is None:
        note = _CUT_NOTE.search(text)
        if note is None:
            length = len(text)
        else:
            text, length = text[: note.start()], note.start() + int(note[1])
            if length <= limit:  # cut shorter when read than this limit would cut it
                return f"{text}{note[0]}"
    if length <= limit:
        return text
    kept = text[:limit]
    return f"{kept}\n[... {length - len(kept)} more characters cut]"


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
        parts.append(f"Attempt {k}:\n```\n{truncate(row['content'], max_artifact_chars)}\n```\nFeedback: {feedback}")
    return "\n\n".join(parts)


def constraints_of(chain: Chain) -> str:
    """The constraints the chain's task ran under (its accepted row's, else any row's)."""
    row = target(chain) or {}
    return row.get("constraints") or next((r["constraints"] for r in chain.rows if r.get("constraints")), "") or ""


def system_text(chain: Chain, role: str = "") -> str:
    return "\n\n".join(p for p in (role.strip(), constraints_of(chain).strip()) if p)


def prompt(
    chain: Chain,
    *,
    history: bool = True,
    max_history: int = 3,
    max_artifact_chars: int = 4000,
    template: Template = Template(),
) -> list[dict]:
    """The prompt messages (system?, user); ``history=False`` gives the first-attempt prompt."""
    if template.format == ATOMICGUARD:
        return _atomicguard_prompt(chain, history, max_history, max_artifact_chars, template)
    messages = []
    system = system_text(chain, template.role)
    if system:
        messages.append({"role": "system", "content": system})
    user = chain.specification
    past = history_text(chain, max_history, max_artifact_chars) if history else ""
    if past:
        user = f"{user}\n\n{HISTORY_HEADING}:\n\n{past}"
    messages.append({"role": "user", "content": user})
    return messages


def _atomicguard_prompt(
    chain: Chain, history: bool, max_history: int, max_artifact_chars: int, t: Template
) -> list[dict]:
    """What atomicguard's generator sends for this attempt: its PromptTemplate.render, section by section."""
    constraints = constraints_of(chain)
    rejected = chain.rejected_before if history and max_history > 0 else []
    shown = rejected[-max_history:] if rejected else []
    feedback = [truncate(feedback_for(chain, row), max_artifact_chars) for row in shown]
    latest = feedback[-1] if feedback else ""

    def fill(text: str) -> str:
        return (
            text.replace("{specification}", chain.specification)
            .replace("{constraints}", constraints)
            .replace("{feedback}", latest)
        )

    parts = [f"# ROLE\n{fill(t.role)}", f"# CONSTRAINTS\n{fill(t.constraints)}"]
    if constraints:
        parts.append(f"# CONTEXT\n{constraints}")
    if feedback:
        parts.append(RETRY_HEADING)
        first = len(rejected) - len(shown) + 1
        parts += [
            f"--- Attempt {k} ---\n{t.feedback_wrapper.format(feedback=text)}"
            for k, text in enumerate(feedback, start=first)
        ]
    parts.append(f"# TASK\n{fill(t.task)}")
    messages = [{"role": "system", "content": t.system}] if t.system else []
    return messages + [{"role": "user", "content": "\n\n".join(parts)}]


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


def answer(row: dict, template: Template = Template()) -> list[dict]:
    """The assistant message of an artifact: as stored, or (atomicguard) in the ```python block
    atomicguard's system message asks for and its generator extracts the code from."""
    content = row["content"]
    if template.format == ATOMICGUARD and "```" not in content:
        content = f"```python\n{content.strip(chr(10))}\n```"
    return [{"role": "assistant", "content": content}]


def chat(
    chain: Chain,
    *,
    history: bool = True,
    max_history: int = 3,
    max_artifact_chars: int = 4000,
    template: Template = Template(),
) -> list[dict]:
    """The whole conversation: prompt messages, then the accepted artifact as the assistant."""
    if chain.accepted is None:
        raise ValueError(f"chain {chain.chain_id} has no accepted attempt")
    return prompt(
        chain, history=history, max_history=max_history, max_artifact_chars=max_artifact_chars, template=template
    ) + answer(chain.accepted, template)


def dpo_pairs(chain: Chain, *, template: Template = Template()) -> list[tuple[list, list, list, dict]]:
    """(prompt, chosen, rejected, rejected row) for each rejected attempt before the accepted one.

    The prompt is the first-attempt prompt: the pair teaches which answer to give up front.
    """
    if chain.accepted is None:
        return []
    first = prompt(chain, history=False, template=template)
    return [(first, answer(chain.accepted, template), answer(row, template), row) for row in chain.rejected_before]


def kto_rows(chain: Chain, *, template: Template = Template()) -> list[tuple[list, list, bool, dict]]:
    """(prompt, completion, desirable, row): the accepted attempt and every rejected one.

    Chains that never succeeded give only undesirable rows.
    """
    first = prompt(chain, history=False, template=template)
    out = [(first, answer(row, template), False, row) for row in chain.rejected_before]
    if chain.accepted is not None:
        out.append((first, answer(chain.accepted, template), True, chain.accepted))
    return out
