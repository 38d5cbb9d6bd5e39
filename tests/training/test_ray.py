"""training.launcher = "ray": the worker as a Ray Train TorchTrainer (lorad.training.ray_launcher).

Each test starts a Ray instance on this machine for its job (``ray_address = ""``: the launcher's
LocalRay) with two CPU workers on gloo, on the tiny model: about a minute each on a shared 2-core
CPU, most of it Ray starting its processes. Skipped where ray is not installed (``make install``
installs the ``ray`` extra, so CI runs them).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from training_helpers import adapter_like_single, output, run_worker, training_starts, worker_env

from lorad.training import checkpoints
from lorad.training import jobdir as jobfile

try:
    import ray.train.torch  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="ray[train] is not installed (pip install 'lorad[ray]'; make install does)"
)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """The driver forwards these to the Ray workers: one torch thread each on the shared CPU."""
    for k, v in worker_env().items():
        if k not in os.environ or os.environ[k] != v:
            monkeypatch.setenv(k, v)


def ray_job(make_job, **overrides) -> Path:
    return make_job(launcher="ray", ray_workers=2, **overrides)


def ray_train_workers(driver_pid: int) -> list[int]:
    """The Ray Train worker processes of the job whose driver is ``driver_pid``: those in the
    session of the Ray instance it started (``ray start``, its child)."""
    from lorad.training.ray_launcher import session

    found = []
    for pid in _children(driver_pid):
        if b"ray.scripts.scripts" in _cmdline(pid):
            found += [p for p in session(pid) if _cmdline(p).startswith(b"ray::RayTrainWorker")]
    return found


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                kids.append(int(name))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_for(condition, what: str, job_dir: Path, proc_alive=None, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert proc_alive is None or proc_alive(), f"ended before {what}:\n{output(job_dir)}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s:\n{output(job_dir)}"
        time.sleep(0.2)
    return found


@needs_ray
@pytest.mark.timeout(420)
def test_two_ray_workers_train_an_adapter_that_loads_like_a_local_runs(make_job, tiny_model_dir):
    import torch

    single = make_job(max_steps=4)
    code, one, out = run_worker(single)
    assert code == jobfile.EXIT_OK, out

    job_dir = ray_job(make_job, max_steps=4)
    argv = jobfile.worker_command(job_dir, jobfile.read_job(job_dir))
    assert argv[-3:] == ["-m", "lorad.training.ray_launcher", str(job_dir)]
    code, two, out = run_worker(job_dir, timeout=400)
    assert code == jobfile.EXIT_OK, out
    assert two.status == "succeeded" and two.processes == 2 and one.processes == 1
    assert two.health["ok"] and two.steps == 4
    # Each of the two ranks consumed its own batches: about twice the tokens per step.
    assert two.tokens > 1.5 * one.tokens
    # Rank 0 alone wrote the progress stream (one record per step, not two).
    assert [r["step"] for r, _ in jobfile.iter_progress(job_dir) if r.get("loss") is not None] == [1, 2, 3, 4]
    assert "world_rank=1" in (job_dir / "worker.log").read_text(errors="replace")  # Ray's rank 1 ran
    assert not (job_dir / "ray").exists()  # Ray Train's own run storage is removed

    model, ids = adapter_like_single(single, job_dir, tiny_model_dir)
    with torch.no_grad():
        trained = model(ids).logits
        with model.disable_adapter():
            bare = model(ids).logits
    assert not torch.allclose(trained, bare)  # the adapter trained (B is zero at the start)


@needs_ray
@pytest.mark.timeout(420)
def test_sigterm_pauses_every_ray_worker_at_the_same_step_with_a_checkpoint_and_exit_75(make_job):
    """SIGTERM to the driver's process group (as the daemon pauses a job) reaches the ranks
    through the stop board; they stop at the same step, checkpoint, and the driver exits 75."""
    import subprocess

    job_dir = ray_job(make_job, max_steps=400, save_steps=1000)
    with open(job_dir / "worker.log", "a") as log:
        proc = subprocess.Popen(
            jobfile.worker_command(job_dir, jobfile.read_job(job_dir)),
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for(
        lambda: ((jobfile.last_progress(job_dir) or {}).get("step") or 0) >= 3,
        "step 3",
        job_dir,
        lambda: proc.poll() is None,
    )
    os.killpg(proc.pid, signal.SIGTERM)  # the way the daemon signals a job: its whole group
    proc.wait(timeout=180)
    assert proc.returncode == jobfile.EXIT_PAUSED, output(job_dir)
    result = jobfile.read_result(job_dir)
    assert result.status == "paused" and result.processes == 2
    assert [p.name for p in checkpoints.complete_checkpoints(job_dir)] == [f"step-{result.steps}"]


@needs_ray
@pytest.mark.timeout(600)
def test_a_lost_ray_worker_fails_the_run_with_the_reason_and_the_next_cycle_resumes_and_promotes(tmp_path):
    """The daemon's path (cycle.run, as a scheduled job runs): a Ray worker killed mid-training
    ends the run as a killed worker does, result.json saying which rank was lost; the job is
    paused with that reason, and its next run resumes from the last complete checkpoint, trains
    to the end, and the gate promotes the adapter."""
    from lorad import cycle, release
    from lorad.buffer.job_table import JobStore
    from lorad.buffer.store import Buffer
    from lorad.sources import open_sources
    from lorad.sources.ingest import ingest
    from lorad.training.tiny import build_tiny_model

    s = cycle_settings(tmp_path, build_tiny_model(tmp_path / "tiny"), steps=40, save_steps=4)
    with Buffer(s.buffer_path) as b:
        ingest(b, open_sources(s.store))
        job_id = JobStore(b.conn).create("manual")["job_id"]
    job_dir = cycle.job_dir_of(s, job_id)

    ended: dict = {}
    first = threading.Thread(
        target=lambda: ended.update(outcome=cycle.run(s, job_id, holder="test", stop=cycle.StopRequest()))
    )
    first.start()
    wait_for(lambda: checkpoints.complete_checkpoints(job_dir), "a checkpoint", job_dir, first.is_alive)
    driver = int((job_dir / "worker.pid").read_text())
    workers = wait_for(lambda: ray_train_workers(driver), "Ray Train workers", job_dir, first.is_alive, 30)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    first.join(timeout=300)
    assert not first.is_alive(), output(job_dir)

    outcome = ended["outcome"]
    assert outcome.status == "paused", (outcome.reason, output(job_dir))
    assert outcome.reason.startswith("worker killed (signal 9): Ray worker of rank "), outcome.reason
    assert "was lost" in outcome.reason
    result = jobfile.read_result(job_dir)
    assert result.status == "failed" and result.reason in outcome.reason
    kept = checkpoints.complete_checkpoints(job_dir)[-1]
    assert 0 < int(kept.name.removeprefix("step-")) < 40

    second = cycle.run(s, job_id, holder="test", stop=cycle.StopRequest())
    assert second.status == "promoted", (second.reason, output(job_dir))
    result = jobfile.read_result(job_dir)
    assert result.succeeded and result.processes == 2 and result.steps == 40
    assert result.resumed_from == str(kept)
    assert [(r["step"], r["resumed"]) for r in training_starts(job_dir)] == [(0, False), (int(kept.name[5:]), True)]
    assert release.open_registry(s).current() == second.version
    with Buffer(s.buffer_path) as b:
        job = JobStore(b.conn).get(job_id)
    assert (job["state"], job["runs"]) == ("promoted", 2)


def cycle_settings(root: Path, base_model: Path, *, steps: int, save_steps: int):
    """A cycle on the fixture store (tests/test_cycle.py's) whose worker is a Ray Train job."""
    from test_cycle import settings_for

    return settings_for(
        root, str(base_model), steps=steps, save_steps=save_steps, training='launcher = "ray"\nray_workers = 2'
    )


def test_without_ray_the_launcher_fails_the_job_saying_how_to_install_it(make_job, monkeypatch):
    """No ray in the worker's Python (the config check passed on another machine, or ray was
    uninstalled since): the job fails with the reason instead of a traceback."""
    from lorad.training import ray_launcher

    job_dir = ray_job(make_job)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert ray_launcher.launch(job_dir) == jobfile.EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    result = jobfile.read_result(job_dir)
    assert result.status == "failed"
    assert "ray cannot be imported" in result.reason and "pip install 'lorad[ray]'" in result.reason
