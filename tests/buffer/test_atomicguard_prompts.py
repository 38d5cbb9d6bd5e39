"""prompt_format "atomicguard": lorad renders exactly what atomicguard's generator sent.

tests/fixtures/atomicguard-prompts was written by the atomicguard library itself (render.py
there): its DualStateAgent and OllamaGenerator against a server that recorded every request,
one task refined after two rejections, one accepted at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorad.buffer import examples, formatting
from lorad.config import ATOMICGUARD_SYSTEM, SelectionSettings
from lorad.sources.atomicguard import AtomicGuardSource
from lorad.sources.ingest import ingest

GOLDEN = Path(__file__).parents[1] / "fixtures" / "atomicguard-prompts"


@pytest.fixture
def chains(buffer, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(GOLDEN / "store", store)
    ingest(buffer, [AtomicGuardSource("s", store, settle_seconds=0)])
    ids = [r[0] for r in buffer.conn.execute("SELECT chain_id FROM chains")]
    return {c.workflow_id: c for c in examples.chains_of(buffer.conn, ids).values()}


@pytest.fixture
def template():
    return formatting.load_template(f"{GOLDEN / 'prompts.json'}:g_coder", "atomicguard", ATOMICGUARD_SYSTEM)


def sent() -> dict:
    return json.loads((GOLDEN / "requests.json").read_text())


def test_first_attempt_prompt_is_the_request_atomicguard_sent_first(chains, template):
    for workflow, requests in sent().items():
        assert formatting.prompt(chains[workflow], history=False, template=template) == requests[0], workflow


def test_history_prompt_is_the_retry_request_that_got_the_accepted_answer(chains, template):
    refined = chains["wf-refined"]
    assert refined.retries == 2
    assert formatting.prompt(refined, history=True, template=template) == sent()["wf-refined"][-1]


def test_the_answer_is_the_stored_code_in_the_block_the_system_message_asks_for(chains, template):
    accepted = chains["wf-refined"].accepted
    (message,) = formatting.answer(accepted, template)
    assert message["content"] == f"```python\n{accepted['content']}\n```"
    assert formatting.answer(accepted)[0]["content"] == accepted["content"]  # lorad's layout: as stored


def test_default_system_message_is_the_one_atomicguard_sends():
    requests = [r for rs in sent().values() for r in rs]
    assert len(requests) == 4  # wf-first's one request and wf-refined's three
    assert all(r[0] == {"role": "system", "content": ATOMICGUARD_SYSTEM} for r in requests)


def test_snapshot_trains_and_scores_under_atomicguard_prompts(buffer, chains, template):
    sel = SelectionSettings(
        prompt_template=f"{GOLDEN / 'prompts.json'}:g_coder",
        prompt_format="atomicguard",
        heldout_min_tasks=0,
        heldout_per_family=0,
        heldout_fraction=0.01,
    )
    examples.refresh(buffer, sel)
    snap = examples.build_snapshot(buffer, sel, method="sft", n=10, replay_ratio=0.0)
    prompts = [row["prompt"] for row in snap.train]
    requests = sent()
    assert requests["wf-refined"][0] in prompts and requests["wf-refined"][-1] in prompts
    assert all(row["completion"][0]["content"].startswith("```python\n") for row in snap.train)


def test_atomicguard_format_needs_a_template_entry(tmp_path):
    with pytest.raises(formatting.TemplateError, match="FILE:KEY"):
        formatting.load_template("", "atomicguard")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"g": {"role": "r", "feedback_mode": "chat"}}))
    with pytest.raises(formatting.TemplateError, match="chat turns"):
        formatting.load_template(f"{path}:g", "atomicguard")
