"""GRPO's training set: the first-attempt prompts of training tasks, drawn from the examples table.

GRPO learns from answers it samples and the guard judges, not from stored answers, so every
training task with a specification serves: first-try, refined and exhausted ones alike (an
exhausted task, which no attempt solved, is where a rewarded sample teaches most). The
[selection] policy, which picks the answers SFT imitates, does not apply; duplicates and the
held-out side are left out as for every method. Prompts are drawn from all training tasks,
not only new ones: a task already trained on still yields fresh samples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from lorad.buffer import examples, formatting, sampling, split
from lorad.buffer.store import Buffer
from lorad.config import SelectionSettings

OUTCOMES = ("first_try", "refined", "exhausted")


@dataclass
class PromptSet:
    rows: list[dict]  # {"prompt": [msgs], "specification": str, "chain_id": str, "metadata": {...}}
    seqs: list[int]
    max_seq: int
    stats: dict


def build_prompts(buffer: Buffer, selection: SelectionSettings, *, n: int) -> PromptSet:
    """Up to ``n`` first-attempt prompts of training tasks (weighted by retries when
    ``selection.replay_weighting`` is "retries": harder tasks come up more often).

    Args:
        selection: the [selection] section (prompt_template, prompt_format, system_message, seed,
            replay_weighting).
        n: prompts to draw.

    Raises:
        formatting.TemplateError: the configured prompt template cannot be used.
    """
    template = formatting.template_of(selection)
    conn = buffer.conn
    marks = ", ".join("?" for _ in OUTCOMES)
    pool = conn.execute(
        f"SELECT seq, retries FROM examples WHERE split = ? AND duplicate_of IS NULL AND outcome IN ({marks})",
        (split.TRAIN, *OUTCOMES),
    ).fetchall()
    max_seq = conn.execute("SELECT max(seq) FROM examples WHERE split = 'train'").fetchone()[0] or 0
    rng = random.Random(selection.seed)
    seqs = sampling.sample_exact(pool, n, rng, selection.replay_weighting)
    by_seq = dict(
        conn.execute(
            "SELECT seq, chain_id FROM examples WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(seqs),)
        ).fetchall()
    )
    chains = examples.chains_of(conn, by_seq.values(), selection.max_text_chars)
    rows: list[dict] = []
    for s in seqs:
        chain = chains.get(by_seq.get(s, ""))
        if chain is None:  # its artifacts vanished under us
            continue
        rows.append(
            {
                "prompt": formatting.prompt(chain, history=False, template=template),
                "specification": chain.specification,
                "chain_id": chain.chain_id,
                "metadata": examples.row_metadata(chain, s, split.TRAIN),
            }
        )
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r["metadata"]["outcome"]] = outcomes.get(r["metadata"]["outcome"], 0) + 1
    stats = {"prompts": len(rows), "pool": len(pool), "outcomes": outcomes, "method": "grpo"}
    return PromptSet(rows=rows, seqs=sorted(s for s in seqs if by_seq.get(s) in chains), max_seq=max_seq, stats=stats)
