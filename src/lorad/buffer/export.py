"""Export training data as JSONL that trl's trainers and AutoTrain load as they are.

Formats (one JSON object a line, each with a "metadata" object):

- chat: ``{"messages": [system?, user, assistant]}`` — the user turn is the first-attempt
  prompt, the one with the history, or (``conditioning = "both"``) a refinement gives a line
  of each, as ``[selection] conditioning`` trains it;
- alpaca: ``{"instruction", "input", "output"}`` — instruction = system text and the
  specification, input = the previous attempts and feedback ("" for the first-attempt line);
- dpo: ``{"prompt", "chosen", "rejected"}`` — one line per rejected attempt of a refinement,
  prompt = the first-attempt prompt;
- kto: ``{"prompt", "completion", "label"}`` — every attempt, accepted ones desirable; chains
  that never succeeded give undesirable lines.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from lorad.buffer import examples, formatting, traces
from lorad.buffer.store import Buffer

FORMATS = ("chat", "alpaca", "dpo", "kto")
SPLITS = ("train", "heldout", "all")
BATCH = 1000


@dataclass
class ExportReport:
    lines: int = 0  # JSONL lines written
    examples: int = 0  # chains exported
    skipped: Counter = field(default_factory=Counter)  # reason -> chains
    duplicates: Counter = field(default_factory=Counter)  # "exact" / "near" -> chains dropped
    other_split: int = 0  # examples left out by --split

    def as_dict(self) -> dict:
        return {
            "lines": self.lines,
            "examples": self.examples,
            "skipped": dict(self.skipped),
            "duplicates_dropped": dict(self.duplicates),
            "other_split": self.other_split,
        }


def lines_for(
    chain: traces.Chain,
    fmt: str,
    meta: dict,
    *,
    max_history: int,
    max_artifact_chars: int,
    template: formatting.Template,
    conditioning: str,
) -> list[dict]:
    """The JSONL objects of one chain in one format (pure); chat and alpaca follow ``conditioning``."""
    first = {"conditioning": formatting.FIRST_ATTEMPT}
    if fmt == "chat":
        return [
            {
                "messages": formatting.chat(
                    chain,
                    history=kind == formatting.HISTORY,
                    max_history=max_history,
                    max_artifact_chars=max_artifact_chars,
                    template=template,
                ),
                "metadata": meta | {"conditioning": kind},
            }
            for kind in formatting.conditionings(chain, conditioning, max_history)
        ]
    if fmt == "alpaca" and template.format == formatting.ATOMICGUARD:
        # The messages atomicguard sends, flattened: the system message and the rendered prompt
        # (which holds the retry history) as the instruction.
        return [
            {
                "instruction": "\n\n".join(m["content"] for m in messages[:-1] if m["content"]),
                "input": "",
                "output": messages[-1]["content"],
                "metadata": meta | {"conditioning": kind},
            }
            for kind in formatting.conditionings(chain, conditioning, max_history)
            for messages in [
                formatting.chat(
                    chain,
                    history=kind == formatting.HISTORY,
                    max_history=max_history,
                    max_artifact_chars=max_artifact_chars,
                    template=template,
                )
            ]
        ]
    if fmt == "alpaca":
        if chain.accepted is None:  # export() counts such chains as unfit and never asks
            raise ValueError(f"chain {chain.chain_id}: alpaca needs an accepted attempt")
        past = formatting.history_text(chain, max_history, max_artifact_chars)
        instruction = "\n\n".join(p for p in (formatting.system_text(chain, template.role), chain.specification) if p)
        return [
            {
                "instruction": instruction,
                "input": f"{formatting.HISTORY_HEADING}:\n\n{past}" if kind == formatting.HISTORY else "",
                "output": chain.accepted["content"],
                "metadata": meta | {"conditioning": kind},
            }
            for kind in formatting.conditionings(chain, conditioning, max_history)
        ]
    if fmt == "dpo":
        return [
            {"prompt": p, "chosen": c, "rejected": r, "metadata": meta | first | {"artifact_id": row["artifact_id"]}}
            for p, c, r, row in formatting.dpo_pairs(chain, template=template)
        ]
    if fmt == "kto":
        return [
            {
                "prompt": p,
                "completion": c,
                "label": label,
                "metadata": meta | first | {"artifact_id": row["artifact_id"]},
            }
            for p, c, label, row in formatting.kto_rows(chain, template=template)
        ]
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _unfit(fmt: str, outcome: str) -> str | None:
    """Why a chain with this outcome gives nothing in this format (None: it fits)."""
    if fmt in ("chat", "alpaca") and outcome == "exhausted":
        return "no_accepted_answer"
    if fmt == "dpo" and outcome != "refined":
        return "no_rejected_attempt" if outcome == "first_try" else "no_accepted_answer"
    return None


def export(
    buffer: Buffer,
    out: IO[str],
    *,
    fmt: str,
    policy: traces.Policy,
    ctx: traces.PolicyContext,
    conditioning: str,
    split: str = "train",
    max_history: int = 3,
    max_artifact_chars: int = 4000,
    template: formatting.Template = formatting.Template(),
    progress: bool = False,
) -> ExportReport:
    """Write the selected examples of the examples table to ``out`` as JSONL.

    Call :func:`lorad.buffer.examples.refresh` first so the table reflects the buffer.

    Args:
        policy, ctx: which chains (see :mod:`lorad.buffer.traces`).
        conditioning: [selection] conditioning: chat and alpaca lines take the first-attempt
            prompt, the history prompt, or both (see :func:`lorad.buffer.formatting.conditionings`).
        split: "train", "heldout" or "all".
        progress: show a progress bar (on a terminal).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    conn = buffer.conn
    report = ExportReport()
    report.skipped.update(examples.skipped_counts(conn))
    where, params = policy.where(ctx)
    total = conn.execute("SELECT count(*) FROM examples").fetchone()[0]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="ex", desc=f"export {fmt}", leave=False)
    last = 0
    try:
        while True:
            page = conn.execute(
                f"SELECT seq, chain_id, split, duplicate, outcome, ({where}) FROM examples WHERE seq > ? "
                f"ORDER BY seq LIMIT {BATCH}",
                (*params, last),
            ).fetchall()
            if not page:
                break
            last = page[-1][0]
            wanted = []
            for seq, chain_id, side, duplicate, outcome, selected in page:
                if split != "all" and side != split:
                    report.other_split += 1
                elif not selected:
                    report.skipped["not_selected"] += 1
                elif _unfit(fmt, outcome):
                    report.skipped[_unfit(fmt, outcome)] += 1
                elif duplicate:
                    report.duplicates[duplicate] += 1
                else:
                    wanted.append((seq, chain_id, side))
            chains = examples.chains_of(conn, [c for _, c, _ in wanted])
            for seq, chain_id, side in wanted:
                chain = chains[chain_id]
                meta = {
                    "chain_id": chain_id,
                    "seq": seq,
                    "split": side,
                    "source": chain.source,
                    "workflow_id": chain.workflow_id,
                    "action_pair_id": chain.action_pair_id,
                    "outcome": chain.outcome,
                    "retries": chain.retries,
                    "artifact_ids": [r["artifact_id"] for r in chain.rows],
                    "accepted_id": chain.accepted["artifact_id"] if chain.accepted else None,
                }
                objs = lines_for(
                    chain,
                    fmt,
                    meta,
                    max_history=max_history,
                    max_artifact_chars=max_artifact_chars,
                    template=template,
                    conditioning=conditioning,
                )
                for obj in objs:
                    out.write(json.dumps(obj, ensure_ascii=False) + "\n")
                report.lines += len(objs)
                report.examples += 1
            if bar is not None:
                bar.update(len(page))
    finally:
        if bar is not None:
            bar.close()
    return report


def export_file(buffer: Buffer, path: str | os.PathLike, **kw) -> ExportReport:
    """:func:`export` into a file, written to a temporary name and renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            report = export(buffer, f, **kw)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return report
