"""Helpers for the training tests: small row sets in each method's format, and running the real
worker on a job directory as a subprocess (the way the daemon does)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def worker_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONUNBUFFERED="1")
    return env


def start_worker(job_dir: Path) -> subprocess.Popen:
    """Start the worker; its output goes to JOB_DIR/worker.log (read it with :func:`output`)."""
    spec = jobfile.read_job(job_dir)
    with open(Path(job_dir) / "worker.log", "a") as log:
        return subprocess.Popen(jobfile.worker_command(job_dir, spec), env=worker_env(),
                                stdout=log, stderr=subprocess.STDOUT)


def output(job_dir: Path) -> str:
    return (Path(job_dir) / "worker.log").read_text(errors="replace")[-4000:]


def run_worker(job_dir: Path, timeout: float = 300) -> tuple[int, dict | None, str]:
    """Run the worker to its end: (exit code, result.json, the end of its output)."""
    proc = start_worker(job_dir)
    proc.wait(timeout=timeout)
    return proc.returncode, jobfile.read_result(job_dir), output(job_dir)
