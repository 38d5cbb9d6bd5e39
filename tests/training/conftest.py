"""Fixtures for the training tests: a tiny Llama built once per session and job directories
for it (helpers in training_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import make_spec, sft_row

from lorad.training import jobdir as jobfile


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 32, 2 layers, vocab 512) with a ChatML tokenizer, built in-process."""
    import torch

    torch.set_num_threads(1)
    from lorad.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def make_job(tmp_path, tiny_model_dir):
    """make_job(rows=None, heldout=None, **spec_overrides) -> job directory for the tiny model."""
    counter = iter(range(1000))

    def make(rows=None, heldout=None, **overrides) -> Path:
        n = next(counter)
        job_dir = tmp_path / f"job{n}"
        values = dict(
            job_id=f"job{n}",
            base_model=str(tiny_model_dir),
            state_dir=str(tmp_path / "state"),
            max_steps=6,
            batch_size=2,
            max_seq_length=64,
            save_steps=2,
            learning_rate=5e-3,
            lora_dropout=0.0,
            evaluate=False,
            eval_batch_size=4,
        )
        values.update(overrides)
        rows = [sft_row(i) for i in range(16)] if rows is None else rows
        heldout = [sft_row(i + 100) for i in range(4)] if heldout is None else heldout
        return jobfile.write_job(job_dir, make_spec(**values), rows, heldout)

    return make
