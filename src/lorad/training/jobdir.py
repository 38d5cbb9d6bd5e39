"""The job directory: what the parent writes for a training worker and what it writes back.

Torch-free: the daemon and the CLI import this module. Layout of ``state_dir/jobs/<job_id>/``:

    job.json          the JobSpec (written by the parent)
    train.jsonl       training rows (SFT, DPO or KTO format, see docs/architecture.md; empty for GRPO)
    prompts.jsonl     GRPO and SFT+GRPO: first-attempt prompts with their specifications
    heldout.jsonl     held-out rows
    progress.jsonl    one JSON object a line from the worker: stage, step, total_steps, loss,
                      learning_rate, tokens_per_s, eta_s, ts (and phase, "sft" or "grpo",
                      in a job of phases: step and total_steps count within the phase)
    result.json       the worker's outcome: a Result (status, reason, adapter, metrics, ...)
    checkpoints/step-N/   complete checkpoints only (written under a temp name, fsynced, renamed);
                      a job of phases (SFT+GRPO) keeps checkpoints/<phase>/step-N per phase and
                      checkpoints/<phase>/adapter once an earlier phase is done
    adapter/          adapter_config.json, adapter_model.safetensors
    plan.json         the parent's own record of what it compared (see lorad.cycle)

The worker runs as ``python -m lorad.training.worker JOB_DIR`` (see :func:`worker_command`)
and exits with one of the EXIT_* codes; result.json always says which, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lorad import durable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PAUSED = 75  # SIGTERM or the end of the training window; resumable from the checkpoint
EXIT_CANCELLED = 76  # SIGINT

STATUS_BY_EXIT = {EXIT_OK: "succeeded", EXIT_FAILED: "failed", EXIT_PAUSED: "paused", EXIT_CANCELLED: "cancelled"}

JOB_FILE = "job.json"
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
PROMPTS_FILE = "prompts.jsonl"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"


SCHEMA_VERSION = 4  # of job.json and result.json; a reader refuses any other (2: GRPO keys, no
# generation_samples; 3: method "sft+grpo", its grpo_steps / grpo_learning_rate and result phases;
# 4: launcher and its ray_* keys)

# Progress stages the worker writes (progress.jsonl "stage"), in the order they come; a
# record whose stage is a status (succeeded, failed, paused, cancelled) is the last one.
STAGE_PREPARING = "preparing"
STAGE_TRAINING = "training"
STAGE_CHECKPOINTED = "checkpointed"
STAGE_SAVING = "saving"
STAGE_EVALUATING = "evaluating"


class JobError(Exception):
    "A job directory is missing, or holds a job.json or result.json this version cannot read."


# JobSpec fields filled from the [training] and [evaluation] sections by name.
_TRAINING_KEYS = (
    "base_model",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "learning_rate",
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "max_seq_length",
    "quantization",
    "processes",
    "accelerate_config",
    "save_steps",
    "gradient_checkpointing",
    "packing",
    "liger_kernel",
    "seed",
    "memory_headroom",
    "num_generations",
    "max_completion_length",
    "temperature",
    "beta",
    "grpo_steps",
    "grpo_learning_rate",
    "launcher",
    "ray_address",
    "ray_workers",
    "ray_cpus_per_worker",
    "ray_gpus_per_worker",
)
_EVALUATION_KEYS = ("eval_batch_size", "guard_command", "guard_timeout", "max_new_tokens")


@dataclass(frozen=True)
class JobSpec:
    """Everything one worker run needs, as plain values: job.json, written by the parent
    (:func:`write_job`) and read by the worker (:func:`read_job`).

    Built by :func:`build_spec` from the config sections; the defaults live in
    :mod:`lorad.config` alone, so no field has one here. Paths are strings so the spec
    round-trips through JSON unchanged. ``parent_adapter`` is the adapter to warm-start
    from (None = a fresh LoRA on the base). ``reference_adapter`` is the adapter serving now,
    scored beside the candidate (None = the bare base model); ``previous_adapter``, when
    set, is scored too (re-scoring the active one). ``window_end`` is a Unix time: at the
    first step end past it the worker checkpoints and exits paused. ``evaluate`` = False
    skips the held-out metrics (health check only). The field meanings are the config keys'
    of the same names (README, config.toml).
    """

    job_id: str
    state_dir: str
    base_model: str
    method: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    learning_rate: float
    max_steps: int
    epochs: float
    batch_size: int
    grad_accum: int
    max_seq_length: int
    quantization: str
    processes: int
    accelerate_config: str
    save_steps: int
    gradient_checkpointing: bool
    packing: bool | str  # True, False or "auto"
    liger_kernel: bool | str  # True, False or "auto"
    seed: int
    memory_headroom: float
    num_generations: int
    max_completion_length: int
    temperature: float
    beta: float
    grpo_steps: int
    grpo_learning_rate: float
    launcher: str  # "local" or "ray"
    ray_address: str
    ray_workers: int
    ray_cpus_per_worker: float
    ray_gpus_per_worker: float
    eval_batch_size: int
    guard_command: tuple[str, ...]
    guard_timeout: float
    max_new_tokens: int
    parent_adapter: str | None
    reference_adapter: str | None
    previous_adapter: str | None
    window_end: float | None
    evaluate: bool
    schema_version: int = SCHEMA_VERSION

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        """Raises JobError on another schema version, an unknown key or a missing one."""
        _check_version(data, "job.json")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data) - {"schema_version"})
        if unknown or missing:
            raise JobError(f"job.json: unknown keys {unknown}, missing keys {missing}")
        values = dict(data)
        for key in ("target_modules", "guard_command"):
            values[key] = tuple(values[key])
        return cls(**values)


def build_spec(
    job_id: str,
    state_dir,
    training,
    evaluation,
    *,
    parent_adapter: str | None = None,
    reference_adapter: str | None = None,
    previous_adapter: str | None = None,
    window_end: float | None = None,
    evaluate: bool = True,
) -> JobSpec:
    """The JobSpec for a run of ``training`` and ``evaluation`` (the config sections).

    ``parent_adapter`` is used only when ``training.warm_start`` is true.
    """
    values = {k: getattr(training, k) for k in _TRAINING_KEYS}
    values |= {k: getattr(evaluation, k) for k in _EVALUATION_KEYS}
    values["target_modules"] = tuple(values["target_modules"])
    values["guard_command"] = tuple(values["guard_command"])
    return JobSpec(
        job_id=job_id,
        state_dir=str(state_dir),
        parent_adapter=parent_adapter if training.warm_start else None,
        reference_adapter=reference_adapter,
        previous_adapter=previous_adapter,
        window_end=window_end,
        evaluate=evaluate,
        **values,
    )


@dataclass
class Result:
    """The worker's outcome: result.json, written by the worker (:func:`write_result`) and read
    by the parent (:func:`read_result`). Every run ends with one, whatever its status.

    ``metrics`` maps a label ("candidate", "active": the reference adapter or the bare base,
    and "previous" when re-scoring) to :func:`lorad.evaluation.metrics.evaluate`'s metrics.
    ``health`` is the finite-logits check: ``{"ok": bool, "reason": str}``.
    """

    job_id: str
    status: str = "failed"  # succeeded | failed | paused | cancelled (STATUS_BY_EXIT)
    reason: str = ""
    error: str | None = None
    traceback: str | None = None
    method: str | None = None
    adapter: str | None = None
    final_loss: float | None = None
    steps: int = 0
    total_steps: int | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    peak_memory_bytes: int | None = None
    memory_estimate: dict | None = None
    device: str | None = None
    processes: int | None = None
    base_model: str | None = None  # the resolved local path
    resumed_from: str | None = None
    health: dict | None = None
    metrics: dict | None = None
    # What the run did to go fast: threads, packing (and why or why not), completion_head,
    # liger_kernel, gradient_checkpointing (see lorad.training.speed).
    speed: dict | None = None
    # A job of several phases ("sft+grpo"): one entry per phase trained, in order, with its
    # method, steps, total_steps, final_loss, train_seconds, resumed_from and speed; the
    # fields above sum the steps and seconds and keep the last phase's loss.
    phases: list[dict] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def succeeded(self) -> bool:
        return self.status == STATUS_BY_EXIT[EXIT_OK]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Result:
        """Raises JobError on another schema version or an unknown key."""
        _check_version(data, "result.json")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown or "job_id" not in data:
            raise JobError(f"result.json: unknown keys {unknown}" if unknown else "result.json: no job_id")
        return cls(**data)


def _check_version(data, what: str) -> None:
    if not isinstance(data, dict):
        raise JobError(f"{what}: not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise JobError(
            f"{what}: schema version {version!r}, this lorad reads version {SCHEMA_VERSION} "
            f"(written by another lorad version?)"
        )


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


def write_job(job_dir, spec: JobSpec, train_rows, heldout_rows, prompt_rows=None) -> Path:
    """Create a job directory: job.json plus the train and held-out snapshots, and for GRPO
    the prompts (``{"prompt": [msgs], "specification": str, "metadata": {...}}`` each).

    Returns:
        The job directory.
    """
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(job_dir / TRAIN_FILE, train_rows)
    write_jsonl(job_dir / HELDOUT_FILE, heldout_rows)
    if prompt_rows is not None:
        write_jsonl(job_dir / PROMPTS_FILE, prompt_rows)
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
    except JobError as e:
        raise JobError(f"{path}: {e}") from None
    except TypeError as e:
        raise JobError(f"{path}: {e}") from None


def write_result(job_dir, result: Result) -> None:
    atomic_write(Path(job_dir) / RESULT_FILE, json.dumps(result.as_dict(), indent=2, default=str) + "\n")


def read_result(job_dir) -> Result | None:
    """The worker's result.json, or None when it has not written one (yet).

    Raises:
        JobError: it is not valid JSON or not a result this version can read.
    """
    path = Path(job_dir) / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise JobError(f"{path}: not valid JSON: {e}") from None
    return Result.from_dict(data)


def iter_progress(job_dir, offset: int = 0) -> Iterator[tuple[dict, int]]:
    """Progress records from ``offset`` on, each with the offset after it.

    A last line still being written (no newline yet) is left for the next call, so a reader
    polling with the returned offsets sees every record exactly once.
    """
    path = Path(job_dir) / PROGRESS_FILE
    try:
        f = open(path, "rb")  # noqa: SIM115 - the with below closes it; only the open may be missing
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
    With ``spec.launcher == "ray"``: ``python -m lorad.training.ray_launcher JOB_DIR``, the
    driver of a Ray Train job (:mod:`lorad.training.ray_launcher`), which exits the same way.
    """
    job_dir = str(job_dir)
    if spec.launcher == "ray":
        return [sys.executable, "-m", "lorad.training.ray_launcher", job_dir]
    if spec.processes <= 1:
        return [sys.executable, "-m", "lorad.training.worker", job_dir]
    return [sys.executable, "-m", "lorad.training.worker", "--launch", job_dir]


def launch_command(job_dir, spec: JobSpec) -> list[str]:
    """``accelerate launch`` with ``spec.processes`` worker processes (DDP over
    torch.distributed; on a machine without CUDA, CPU processes with the gloo backend), or
    with ``spec.accelerate_config`` (FSDP and the like)."""
    job_dir = str(job_dir)
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(spec.processes)]
    # Jobs on one host must not collide on torch.distributed's default port 29500 (a config file's
    # main_process_port included: lorad launches one machine's ranks, any free port serves).
    argv += ["--main_process_port", str(_free_port())]
    if spec.accelerate_config:
        argv += ["--config_file", spec.accelerate_config]
    else:
        # --multi_gpu selects accelerate's torchrun launcher; without CUDA its processes run
        # on the CPU and torch.distributed uses gloo. (--cpu would launch a single process.)
        argv += [
            "--multi_gpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
    return argv + ["-m", "lorad.training.worker", job_dir]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
