"""training.processes = 2: the worker under `accelerate launch` (DDP, gloo on the CPU)."""

from __future__ import annotations

import torch
from training_helpers import adapter_like_single, run_worker

from lorad.training import jobdir as jobfile

torch.set_num_threads(1)


def test_two_process_run_saves_an_adapter_of_the_same_shape_that_loads_the_same_way(make_job, tiny_model_dir):
    single = make_job(max_steps=2)
    code, one, out = run_worker(single)
    assert code == jobfile.EXIT_OK, out

    job_dir = make_job(max_steps=2, processes=2)
    assert "--launch" in jobfile.worker_command(job_dir, jobfile.read_job(job_dir))
    code, two, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out
    assert two.processes == 2 and one.processes == 1
    # Each of the two ranks consumed its own batches: twice the tokens per step.
    assert two.tokens > 1.5 * one.tokens
    # Only rank 0 wrote the progress stream (one record per step, not two).
    steps = [r["step"] for r, _ in jobfile.iter_progress(job_dir) if r.get("loss") is not None]
    assert steps == [1, 2]

    adapter_like_single(single, job_dir, tiny_model_dir)


def test_two_process_run_pauses_on_sigterm_with_the_paused_exit_code(make_job):
    """All ranks stop at the same step (no rank left waiting in an all-reduce)."""
    import os
    import signal
    import subprocess
    import time

    from training_helpers import output, worker_env

    job_dir = make_job(max_steps=300, save_steps=1000, processes=2)
    with open(job_dir / "worker.log", "a") as log:
        proc = subprocess.Popen(
            jobfile.worker_command(job_dir, jobfile.read_job(job_dir)),
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while ((jobfile.last_progress(job_dir) or {}).get("step") or 0) < 3:
        assert proc.poll() is None, output(job_dir)
        assert time.monotonic() < deadline, output(job_dir)
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the way the daemon signals a job: its whole group
    proc.wait(timeout=180)
    assert proc.returncode == jobfile.EXIT_PAUSED, output(job_dir)
    result = jobfile.read_result(job_dir)
    assert result.status == "paused" and result.processes == 2
    from lorad.training.checkpoints import complete_checkpoints

    assert [p.name for p in complete_checkpoints(job_dir)] == [f"step-{result.steps}"]
