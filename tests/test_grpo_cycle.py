"""A GRPO cycle through lorad's own pipeline: the prompts the parent writes, and a whole job."""

from __future__ import annotations

import sys
from pathlib import Path

from lorad import config, cycle
from lorad.buffer.formatting import HISTORY_HEADING
from lorad.buffer.store import Buffer
from lorad.training.jobdir import PROMPTS_FILE, TRAIN_FILE, read_job, read_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
GUARD = FIXTURES / "task_guard.py"


def grpo_settings(root: Path, base_model: str, steps: int = 2, method: str = "grpo") -> config.Settings:
    sft_phase = "grpo_steps = 2\ngrpo_learning_rate = 0.005" if method == "sft+grpo" else ""
    return config.loads(f"""
[daemon]
state_dir = "{root / "state"}"
[[store.sources]]
kind = "atomicguard"
path = "{FIXTURES / "atomicguard-store"}"
[selection]
heldout_fraction = 0.3
[training]
base_model = "{base_model}"
method = "{method}"
max_steps = {steps}
{sft_phase}
batch_size = 4
num_generations = 2
max_completion_length = 8
learning_rate = 0.01
quantization = "none"
gradient_checkpointing = false
warm_start = false
[evaluation]
guard_command = ["{sys.executable}", "{GUARD}"]
max_new_tokens = 8
min_heldout_examples = 1
""")


def test_prepare_writes_first_attempt_prompts_of_every_training_task_for_grpo(tmp_path):
    """First-try, refined and exhausted tasks all give prompts, without history, whatever the policy."""
    settings = grpo_settings(tmp_path, "unused")
    with Buffer(settings.buffer_path) as buffer:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(buffer, open_sources(settings.store), 100)
        job_dir = cycle.prepare(settings, buffer, "j1")
        outcomes = dict(
            buffer.conn.execute(
                "SELECT outcome, count(*) FROM examples WHERE split = 'train' AND duplicate_of IS NULL GROUP BY 1"
            )
        )
    prompts = read_jsonl(job_dir / PROMPTS_FILE)
    assert read_jsonl(job_dir / TRAIN_FILE) == []
    got: dict[str, int] = {}
    for row in prompts:
        got[row["metadata"]["outcome"]] = got.get(row["metadata"]["outcome"], 0) + 1
        assert row["specification"] and row["prompt"][-1]["role"] == "user"
        assert HISTORY_HEADING not in row["prompt"][-1]["content"]
        assert row["prompt"][-1]["content"].startswith(row["specification"])
    assert got == outcomes and set(got) >= {"first_try", "refined"}
    assert read_job(job_dir).method == "grpo"
    plan = cycle.Plan.read(job_dir)
    assert plan.examples["count"] == len(prompts) and plan.examples["stats"]["method"] == "grpo"


def test_a_grpo_cycle_trains_scores_and_concludes(tmp_path):
    from lorad.training.tiny import build_tiny_model

    settings = grpo_settings(tmp_path, str(build_tiny_model(tmp_path / "tiny")))
    outcome = cycle.run_now(settings)
    assert outcome.status in ("promoted", "rejected"), outcome.reason
    assert outcome.version and outcome.training["steps"] == 2
    assert set(outcome.metrics) >= {"candidate", "active"}
    assert "epsilon" in outcome.metrics["candidate"]


def test_an_sft_then_grpo_cycle_writes_both_sets_and_records_both_phases(tmp_path):
    from lorad.training.tiny import build_tiny_model

    settings = grpo_settings(tmp_path, str(build_tiny_model(tmp_path / "tiny")), steps=3, method="sft+grpo")
    with Buffer(settings.buffer_path) as buffer:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(buffer, open_sources(settings.store), 100)
        job_dir = cycle.prepare(settings, buffer, "j1")
    train, prompts = read_jsonl(job_dir / TRAIN_FILE), read_jsonl(job_dir / PROMPTS_FILE)
    assert train and prompts
    plan = cycle.Plan.read(job_dir)
    # the version covers the examples of either phase
    assert plan.examples["count"] >= len(prompts) and plan.examples["stats"]["method"] == "sft+grpo"

    outcome = cycle.run_now(settings)
    assert outcome.status in ("promoted", "rejected"), outcome.reason
    assert [(p["method"], p["steps"]) for p in outcome.training["phases"]] == [("sft", 3), ("grpo", 2)]
    assert outcome.training["steps"] == 5 and "epsilon" in outcome.metrics["candidate"]
    from lorad.commands import render

    assert "phases: sft 3 steps, final loss" in render.outcome(outcome) and "; grpo 2 steps" in render.outcome(outcome)
