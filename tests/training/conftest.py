"""Fixtures for the training tests: a tiny Llama built once per session, small row sets, and
helpers that write a job directory and run the real worker in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorad.training import job as jobfile

SPECS = [
    ("is_even(n)", "def is_even(n):\n    return n % 2 == 0"),
    ("add(a, b)", "def add(a, b):\n    return a + b"),
    ("reverse(s)", "def reverse(s):\n    return s[::-1]"),
    ("square(x)", "def square(x):\n    return x * x"),
    ("first(xs)", "def first(xs):\n    return xs[0]"),
    ("last(xs)", "def last(xs):\n    return xs[-1]"),
    ("neg(x)", "def neg(x):\n    return -x"),
    ("double(x)", "def double(x):\n    return 2 * x"),
]


def sft_row(i: int) -> dict:
    name, code = SPECS[i % len(SPECS)]
    return {"prompt": [{"role": "system", "content": "Answer with code only."},
                       {"role": "user", "content": f"Write {name}. Attempt {i}."}],
            "completion": [{"role": "assistant", "content": code}],
            "specification": f"Write {name}.", "chain_id": f"c{i}", "metadata": {"i": i}}


def dpo_row(i: int) -> dict:
    r = sft_row(i)
    return {"prompt": r["prompt"], "chosen": r["completion"],
            "rejected": [{"role": "assistant", "content": "def f(x):\n    pass"}]}


def kto_row(i: int) -> dict:
    r = sft_row(i // 2)
    good = i % 2 == 0
    answer = r["completion"] if good else [{"role": "assistant", "content": "return None"}]
    return {"prompt": r["prompt"], "completion": answer, "label": good}


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
        values = dict(job_id=f"job{n}", base_model=str(tiny_model_dir), state_dir=str(tmp_path / "state"),
                      max_steps=6, batch_size=2, max_seq_length=64, save_steps=2, learning_rate=5e-3,
                      lora_dropout=0.0, evaluate=False, eval_batch_size=4)
        values.update(overrides)
        rows = [sft_row(i) for i in range(16)] if rows is None else rows
        heldout = [sft_row(i + 100) for i in range(4)] if heldout is None else heldout
        return jobfile.write_job(job_dir, jobfile.JobSpec(**values), rows, heldout)

    return make


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    return env


def start_worker(job_dir: Path) -> subprocess.Popen:
    spec = jobfile.read_job(job_dir)
    return subprocess.Popen(jobfile.worker_command(job_dir, spec), env=worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_worker(job_dir: Path, timeout: float = 300) -> tuple[int, dict | None, str]:
    """Run the worker to its end: (exit code, result.json, output)."""
    proc = start_worker(job_dir)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, jobfile.read_result(job_dir), out


@pytest.fixture
def worker():
    return run_worker
