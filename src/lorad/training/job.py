"""The job directory: what the parent writes for a training worker and what it writes back.

Torch-free: the daemon and the CLI import this module. Layout of ``state_dir/jobs/<job_id>/``:

    job.json          the JobSpec (written by the parent)
    train.jsonl       training rows (SFT, DPO or KTO format, see docs/architecture.md)
    heldout.jsonl     held-out rows
    progress.jsonl    one JSON object a line from the worker: stage, step, total_steps, loss,
                      learning_rate, tokens_per_s, eta_s, ts
    result.json       the worker's outcome (status, reason, adapter, losses, metrics, ...)
    checkpoints/step-N/   complete checkpoints only (written under a temp name, fsynced, renamed)
    adapter/          adapter_config.json, adapter_model.safetensors, manifest.json (sha256)

The worker runs as ``python -m lorad.training.worker JOB_DIR`` (see :func:`worker_command`)
and exits with one of the EXIT_* codes; result.json always says which, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lorad import durable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PAUSED = 75  # SIGTERM or the end of the training window; resumable from the checkpoint
EXIT_CANCELLED = 76  # SIGINT

STATUS_BY_EXIT = {EXIT_OK: "succeeded", EXIT_FAILED: "failed", EXIT_PAUSED: "paused",
                  EXIT_CANCELLED: "cancelled"}

JOB_FILE = "job.json"
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"


class JobError(Exception):
    "A job directory is missing or holds an unreadable job.json."


@dataclass(frozen=True)
class JobSpec:
    """Everything one worker run needs, as plain values (stored as job.json).

    Paths are strings so the spec round-trips through JSON unchanged. ``parent_adapter`` is
    the adapter to warm-start from (None = fresh LoRA on the base). ``reference_adapter`` is
    the adapter serving now, scored beside the candidate (None = the bare base model);
    ``previous_adapter``, when set, is scored too (for re-scoring the active one).
    ``window_end`` is a Unix time: at the first step end past it the worker checkpoints and
    exits paused. ``evaluate`` = False skips the held-out metrics (health check only).
    """

    job_id: str
    base_model: str
    state_dir: str
    method: str = "sft"
    lora_r: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    learning_rate: float = 2e-4
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_length: int = 512
    quantization: str = "auto"
    processes: int = 1
    accelerate_config: str = ""
    save_steps: int = 50
    gradient_checkpointing: bool = True
    packing: bool = False
    seed: int = 0
    memory_headroom: float = 0.9
    parent_adapter: str | None = None
    reference_adapter: str | None = None
    previous_adapter: str | None = None
    window_end: float | None = None
    offline: bool = True
    evaluate: bool = True
    eval_batch_size: int = 8
    guard_command: tuple[str, ...] = ()
    generation_samples: int = 32
    guard_timeout: float = 30.0
    max_new_tokens: int = 256
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobError(f"job.json: unknown keys {unknown}")
        values = dict(data)
        for key in ("target_modules", "guard_command"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def spec_from_settings(settings, job_id: str, *, parent_adapter: str | None = None,
                       reference_adapter: str | None = None, previous_adapter: str | None = None,
                       window_end: float | None = None, evaluate: bool = True) -> JobSpec:
    """A JobSpec from the [training] and [evaluation] sections of loaded Settings.

    ``parent_adapter`` is only used when ``training.warm_start`` is true.
    """
    t, e = settings.training, settings.evaluation
    return JobSpec(
        job_id=job_id, base_model=t.base_model, state_dir=str(settings.state_dir), method=t.method,
        lora_r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
        target_modules=tuple(t.target_modules), learning_rate=t.learning_rate, max_steps=t.max_steps,
        epochs=t.epochs, batch_size=t.batch_size, grad_accum=t.grad_accum,
        max_seq_length=t.max_seq_length, quantization=t.quantization, processes=t.processes,
        accelerate_config=t.accelerate_config, save_steps=t.save_steps,
        gradient_checkpointing=t.gradient_checkpointing, packing=t.packing, seed=t.seed,
        memory_headroom=t.memory_headroom,
        parent_adapter=parent_adapter if t.warm_start else None,
        reference_adapter=reference_adapter, previous_adapter=previous_adapter,
        window_end=window_end, evaluate=evaluate, eval_batch_size=e.eval_batch_size,
        guard_command=tuple(e.guard_command), generation_samples=e.generation_samples,
        guard_timeout=e.guard_timeout, max_new_tokens=e.max_new_tokens)


# -- writing and reading ------------------------------------------------------------------------


def atomic_write(path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a part: temp, fsync, rename."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    durable.fsync(path.parent)




def write_jsonl(path, rows) -> int:
    """Write rows as JSON lines (atomically); returns how many."""
    rows = list(rows)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_job(job_dir, spec: JobSpec, train_rows, heldout_rows) -> Path:
    """Create a job directory: job.json plus the train and held-out snapshots.

    Returns:
        The job directory.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(job_dir / TRAIN_FILE, train_rows)
    write_jsonl(job_dir / HELDOUT_FILE, heldout_rows)
    atomic_write(job_dir / JOB_FILE, json.dumps(spec.as_dict(), indent=2) + "\n")
    return job_dir


def read_job(job_dir) -> JobSpec:
    """The JobSpec of a job directory.

    Raises:
        JobError: no job.json there, or it is not a valid spec.
    """
    path = Path(job_dir) / JOB_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"{path}: no such job file") from None
    except json.JSONDecodeError as e:
        raise JobError(f"{path}: not valid JSON: {e}") from None
    try:
        return JobSpec.from_dict(data)
    except TypeError as e:
        raise JobError(f"{path}: {e}") from None


def write_result(job_dir, result: dict) -> None:
    atomic_write(Path(job_dir) / RESULT_FILE, json.dumps(result, indent=2, default=str) + "\n")


def read_result(job_dir) -> dict | None:
    """The worker's result.json, or None when it has not written one (yet)."""
    path = Path(job_dir) / RESULT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def iter_progress(job_dir, offset: int = 0) -> Iterator[tuple[dict, int]]:
    """Progress records from ``offset`` on, each with the offset after it.

    A last line still being written (no newline yet) is left for the next call, so a reader
    polling with the returned offsets sees every record exactly once.
    """
    path = Path(job_dir) / PROGRESS_FILE
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return
            offset += len(line)
            try:
                yield json.loads(line), offset
            except json.JSONDecodeError:
                continue


def last_progress(job_dir) -> dict | None:
    """The newest progress record, or None."""
    last = None
    for record, _ in iter_progress(job_dir):
        last = record
    return last


def worker_command(job_dir, spec: JobSpec) -> list[str]:
    """The argv that runs the worker on ``job_dir``.

    One process: ``python -m lorad.training.worker JOB_DIR``. With ``spec.processes > 1``:
    ``python -m lorad.training.worker --launch JOB_DIR``, which runs :func:`launch_command`
    (``accelerate launch``), forwards SIGTERM/SIGINT to it, and exits with the EXIT_* code of
    the outcome in result.json (the launcher's own exit code cannot tell paused from failed).
    """
    job_dir = str(job_dir)
    if spec.processes <= 1:
        return [sys.executable, "-m", "lorad.training.worker", job_dir]
    return [sys.executable, "-m", "lorad.training.worker", "--launch", job_dir]


def launch_command(job_dir, spec: JobSpec) -> list[str]:
    """``accelerate launch`` with ``spec.processes`` worker processes (DDP over
    torch.distributed; on a machine without CUDA, CPU processes with the gloo backend), or
    with ``spec.accelerate_config`` (FSDP and the like)."""
    job_dir = str(job_dir)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(spec.processes)]
    if spec.accelerate_config:
        argv += ["--config_file", spec.accelerate_config]
    else:
        # --multi_gpu selects accelerate's torchrun launcher; without CUDA its processes run
        # on the CPU and torch.distributed uses gloo. (--cpu would launch a single process.)
        argv += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return argv + ["-m", "lorad.training.worker", job_dir]


def _free_port() -> int:
    # Jobs on one host must not collide on torch.distributed's default port 29500.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
