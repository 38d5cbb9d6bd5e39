"""The worker as a Ray Train job: ``python -m lorad.training.ray_launcher JOB_DIR``
(``[training] launcher = "ray"``).

This process is the Ray driver, in the worker's place: the parent (supervisor, cycle) starts it,
signals it and reads its exit code and result.json as it does a local worker's. Top to bottom,
:func:`launch`:

1. setup: connect to the cluster at ``ray_address``, or start a Ray instance on this machine for
   the job (:class:`LocalRay`, ``ray_address = ""``);
2. train: a Ray Train ``TorchTrainer`` of ``ray_workers`` workers (gloo on CPUs, NCCL on GPUs),
   each running :func:`rank_main`, which is the per-rank code a rank runs under ``accelerate
   launch`` (:func:`lorad.training.worker.run`) with its rank and world size from Ray's context.
   Rank 0 writes progress.jsonl, the checkpoints, the adapter and result.json into the job
   directory, so every node must see the state directory at the same path (a shared filesystem;
   Ray Train asks the same of its own storage on more than one node);
3. the exit code: rank 0's (0, 1, 75, 76), or, when Ray lost a worker (its process killed, its
   node gone), result.json says so and this process ends by SIGKILL, as a killed local worker
   does, so the parent pauses the job and its next run resumes from the last complete checkpoint
   (``schedule.max_worker_kills`` such ends in a row fail it);
4. cleanup: disconnect, and stop the instance it started.

Signals: SIGTERM (pause) and SIGINT (cancel) only set this process's flags; the main loop hands
them to a :class:`StopBoard` actor that every rank reads at short intervals (:func:`follow`),
and the ranks agree at the next step end (:func:`lorad.training.callback.agree_on_stop`), so a
pause checkpoints and exits 75 as a local worker does. Ray is imported here and in the ranks
only: never by the daemon.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

from lorad.training import jobdir as jobfile
from lorad.training.callback import Flags
from lorad.training.jobdir import EXIT_CANCELLED, EXIT_FAILED, EXIT_PAUSED, STATUS_BY_EXIT
from lorad.training.supervisor import live_processes

POLL = 0.5  # seconds between the driver's looks at its flags, and the ranks' at the stop board
START_TIMEOUT = 120.0  # seconds for a local Ray instance to come up
STOP_GRACE = 5.0  # seconds a local Ray instance gets to stop after SIGTERM before SIGKILL
RAY_DIR = "ray"  # Ray Train's run storage in the job directory (RunConfig.storage_path); lorad reads nothing there
# The local instance's object store: lorad passes no data through it (rows and checkpoints stay in
# the job directory), and Ray refuses less than 75 MiB.
OBJECT_STORE_BYTES = 80 * 1024 * 1024
# The driver's environment the workers get too (a node of a cluster does not inherit it).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "TRANSFORMERS_VERBOSITY",
    "PYTHONUNBUFFERED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
_STRENGTH = {None: 0, "pause": 1, "cancel": 2}


class RayUnavailable(Exception):
    "Ray cannot be imported here, or the Ray instance for the job did not start."


class JobDirUnreachable(Exception):
    "A Ray worker does not see the job directory (the state directory is not shared with its node)."


def launch(job_dir) -> int:
    """Run the job in ``job_dir`` as a Ray Train job and exit as a single worker would.

    Returns:
        The EXIT_* code of the outcome, which result.json records. A lost worker does not return:
        this process ends by SIGKILL once result.json says which worker was lost.
    """
    job_dir = Path(job_dir)
    spec = jobfile.read_job(job_dir)
    flags = Flags()
    signal.signal(signal.SIGTERM, flags.on_sigterm)
    signal.signal(signal.SIGINT, flags.on_sigint)
    ray: Any = None
    local: LocalRay | None = None
    try:
        try:
            ray = importlib.import_module("ray")
        except ImportError as e:
            raise RayUnavailable(
                f'training.launcher = "ray", but ray cannot be imported here ({e}); '
                "install the extra: pip install 'lorad[ray]'"
            ) from None
        if not spec.ray_address:
            local = LocalRay(
                cpus=spec.ray_workers * spec.ray_cpus_per_worker, gpus=spec.ray_workers * spec.ray_gpus_per_worker
            )
        ray.init(
            address=local.start() if local else spec.ray_address,
            _node_ip_address=LocalRay.HOST if local else None,
            runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}},
            log_to_driver=True,  # the ranks' output into worker.log, beside this process's
            logging_level="WARNING",
        )
        # ray.init installs Ray's failure signal handler over SIGTERM (it logs and aborts the
        # driver, exit -6): a pause would kill the job instead. Python's handlers go back on top.
        signal.signal(signal.SIGTERM, flags.on_sigterm)
        signal.signal(signal.SIGINT, flags.on_sigint)
        outcome = fit(spec, job_dir, flags)
    except RayUnavailable as e:
        outcome = Outcome.failed(str(e))
    except Exception as e:  # could not connect, or lost the cluster: the worker always reports
        outcome = Outcome.failed(f"{type(e).__name__}: {e}")
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        if local is not None:
            local.stop()
        shutil.rmtree(job_dir / RAY_DIR, ignore_errors=True)
    if outcome.result is not None:
        result = jobfile.Result(job_id=spec.job_id, method=spec.method, processes=spec.ray_workers, **outcome.result)
        jobfile.write_result(job_dir, result)
    if outcome.lost:
        _die_of(signal.SIGKILL)
    return outcome.code


class Outcome:
    """What :func:`fit` ended with: the exit code, and the result.json the driver writes itself
    (None when rank 0 wrote it); ``lost`` when Ray lost a worker."""

    def __init__(self, code: int, result: dict | None = None, lost: bool = False):
        self.code, self.result, self.lost = code, result, lost

    @classmethod
    def failed(cls, reason: str, error: str | None = None, lost: bool = False) -> Outcome:
        status = STATUS_BY_EXIT[EXIT_FAILED]
        return cls(EXIT_FAILED, {"status": status, "reason": reason, "error": error or reason}, lost)


def fit(spec: jobfile.JobSpec, job_dir: Path, flags: Flags) -> Outcome:
    """Run the TorchTrainer to its end while the main loop hands stop requests to the ranks.

    Why fit() in a thread: the main thread must run the signal handlers and forward their flags,
    and Ray Train installs a SIGINT handler of its own (an abort, no checkpoint) when fit() runs in
    the main thread.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    board: Any = ray.remote(num_cpus=0)(StopBoard).remote()
    gpu = spec.ray_gpus_per_worker > 0
    resources = {"CPU": spec.ray_cpus_per_worker} | ({"GPU": spec.ray_gpus_per_worker} if gpu else {})
    shutil.rmtree(job_dir / RAY_DIR, ignore_errors=True)  # an earlier run's: lorad's checkpoints resume, not Ray's
    trainer = TorchTrainer(
        cast(Any, rank_main),  # Ray types train functions as returning None; rank 0's code comes back
        train_loop_config={"job_dir": str(job_dir), "board": board},
        scaling_config=ScalingConfig(num_workers=spec.ray_workers, use_gpu=gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        # No retries: a lost worker ends the run, and the parent decides (it resumes the job from
        # lorad's own checkpoints, which Ray Train does not know of).
        run_config=RunConfig(
            name=spec.job_id, storage_path=str(job_dir / RAY_DIR), failure_config=FailureConfig(max_failures=0)
        ),
    )
    ended: dict = {}

    def run():
        try:
            ended["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            ended["error"] = e

    thread = threading.Thread(target=run, name="lorad-ray-fit", daemon=True)
    thread.start()
    told = None
    while thread.is_alive():
        thread.join(POLL)
        if flags.stop != told:
            board.request.remote(flags.stop, flags.reason)
            told = flags.stop
        if told is not None and not ray.get(board.started.remote()):
            # No rank runs yet (the cluster has no room for the workers, say): none will read the
            # board, and there is nothing to checkpoint.
            code = EXIT_PAUSED if told == "pause" else EXIT_CANCELLED
            reason = f"{flags.reason} before any Ray worker ran"
            return Outcome(code, {"status": STATUS_BY_EXIT[code], "reason": reason})
    if "error" in ended:
        return lost_or_failed(ended["error"])
    code = ended["result"].return_value  # rank 0's exit code; rank 0 wrote result.json
    return Outcome(code if code in STATUS_BY_EXIT else EXIT_FAILED)


def lost_or_failed(error: BaseException) -> Outcome:
    """The outcome of a TorchTrainer.fit() that raised: ``lost`` when a worker's process or node
    went away (Ray's health check found its actor dead, or it stopped answering), else failed
    with what the worker (or Ray) said."""
    from ray.exceptions import OutOfMemoryError, RayActorError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

    if isinstance(error, OutOfMemoryError):  # Ray's memory monitor killed workers (a cluster's)
        why = str(error).strip().split("\n")[0]
        return Outcome.failed(f"Ray workers were lost: {why}", str(error), lost=True)
    failures = getattr(error, "worker_failures", {}) if isinstance(error, WorkerGroupError) else {}
    for rank, failure in sorted(failures.items()):
        lost = (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError, RayActorError, OutOfMemoryError)
        if isinstance(failure, lost):
            cause = getattr(failure, "health_check_failure", None) or failure
            why = str(cause).strip().split("\n")[0]
            return Outcome.failed(f"Ray worker of rank {rank} was lost: {why}", f"{error}\n{cause}", lost=True)
    for rank, failure in sorted(failures.items()):
        return Outcome.failed(f"Ray worker of rank {rank} failed: {type(failure).__name__}: {failure}", str(error))
    return Outcome.failed(f"Ray Train failed: {type(error).__name__}: {str(error).strip().splitlines()[0]}", str(error))


def rank_main(config: dict) -> int:
    """One rank, in a Ray Train worker: the per-rank code of :func:`lorad.training.worker.run`,
    its rank and world size from Ray's context and its stop flags from the driver's board.

    Returns:
        The rank's exit code (rank 0's is the job's).

    Raises:
        JobDirUnreachable: this node does not see the job directory.
    """
    import ray.train

    from lorad.training import worker

    context = ray.train.get_context()
    rank = context.get_world_rank()
    job_dir = Path(config["job_dir"])
    if not (job_dir / jobfile.JOB_FILE).is_file():
        raise JobDirUnreachable(
            f"rank {rank} on {socket.gethostname()} does not see {job_dir / jobfile.JOB_FILE}: with "
            f'training.launcher = "ray" every Ray node must mount the state directory at the same path'
        )
    flags = Flags()
    done = threading.Event()
    follower = threading.Thread(target=follow, args=(config["board"], flags, done), name="lorad-stop", daemon=True)
    follower.start()
    try:
        return worker.run(job_dir, rank=rank, processes=context.get_world_size(), flags=flags)
    finally:
        done.set()
        follower.join()


def follow(board, flags: Flags, done: threading.Event, poll: float = POLL) -> None:
    """Copy the driver's stop requests into this rank's ``flags`` until ``done`` (a stronger
    request wins: a cancel after a pause cancels, never the reverse)."""
    import ray

    ray.get(board.start.remote())
    while not done.wait(poll):
        try:
            stop, reason = ray.get(board.read.remote(), timeout=10)
        except Exception:  # the driver is gone: Ray ends this worker with it
            continue
        if _STRENGTH[stop] > _STRENGTH[flags.stop]:
            flags.stop, flags.reason = stop, reason


class StopBoard:
    """A Ray actor: what the driver was asked (pause or cancel, and why), for the ranks to read,
    and whether a rank has started reading."""

    def __init__(self):
        self.stop: str | None = None
        self.reason = ""
        self.ranks = 0

    def request(self, stop: str | None, reason: str) -> None:
        if _STRENGTH[stop] > _STRENGTH[self.stop]:
            self.stop, self.reason = stop, reason

    def read(self) -> tuple[str | None, str]:
        return self.stop, self.reason

    def start(self) -> None:
        self.ranks += 1

    def started(self) -> bool:
        return self.ranks > 0


class LocalRay:
    """A Ray instance on this machine for one job: ``ray start --head --block`` in a session of
    its own, so that the signals the parent sends the worker's process group (SIGTERM to pause)
    reach this driver and not Ray's processes, and tied to this process by the parent-death
    signal, so that it goes with the driver however the driver ends. Its resources are the job's:
    ``cpus`` and ``gpus`` (rounded up), on the loopback address, without a dashboard.
    """

    HOST = "127.0.0.1"

    def __init__(self, cpus: float, gpus: float):
        self.cpus, self.gpus = math.ceil(cpus), math.ceil(gpus)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start it and wait until it runs.

        Returns:
            Its address, for ``ray.init``.

        Raises:
            RayUnavailable: it exited or did not come up within ``timeout`` seconds.
        """
        port = _free_port()
        argv = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--node-ip-address={self.HOST}",
            f"--port={port}",
            f"--num-cpus={self.cpus}",
            f"--num-gpus={self.gpus}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--dashboard-agent-listen-port={_free_port()}",  # its default (52365) may be taken
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        self.proc = subprocess.Popen(
            argv,
            # Ray's memory monitor kills workers when the machine's memory (every program's) passes
            # 95%; on a machine lorad shares, the kernel's OOM killer judges, as for a local worker.
            env=dict(os.environ, RAY_memory_monitor_refresh_ms="0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        ready = threading.Event()
        threading.Thread(target=self._relay, args=(ready,), name="lorad-ray-start", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RayUnavailable(
                    f"the Ray instance for the job did not start (ray start exited with {self.proc.returncode}; "
                    "its output is above in worker.log)"
                    if self.proc.returncode is not None
                    else f"the Ray instance for the job did not start within {timeout:.0f} s"
                )
        return f"{self.HOST}:{port}"

    def _relay(self, ready: threading.Event) -> None:
        """``ray start``'s output into this process's (worker.log), noting when Ray runs."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if b"Ray runtime started" in line:
                ready.set()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM to ``ray start`` (it stops what it started), then SIGKILL to whatever of its
        session still runs after ``grace`` seconds (Ray's workers make process groups of their own
        inside it)."""
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in session(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def session(sid: int) -> list[int]:
    """The running processes of session ``sid``."""
    return [pid for pid, fields in live_processes() if int(fields[3]) == sid]


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def _die_of(signum: int) -> None:
    """End this process by ``signum``, as the worker it stands for was ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    if signum != signal.SIGKILL:  # whose action cannot be changed (signal.signal raises)
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LocalRay.HOST, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """``python -m lorad.training.ray_launcher JOB_DIR``: :func:`launch`, exiting as a worker does.

    Its own entry point, not a flag of the worker's: the ranks run the worker's code, so the
    worker must not import this module back.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lorad.training.ray_launcher JOB_DIR", file=sys.stderr)
        return 2
    try:
        return launch(argv[0])
    except jobfile.JobError as e:
        print(f"lorad worker: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
