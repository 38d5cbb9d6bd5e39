"""The training worker: ``python -m lorad.training.worker JOB_DIR``.

Reads the job directory the parent wrote (see :mod:`lorad.training.jobdir`), then, top to bottom:

1. setup: resolve the base model (converting a GGUF once), check the learning rate and the
   memory estimate before any step, load the model, attach a fresh or warm-started LoRA;
2. train: a trl trainer (GRPO: trl's GRPOTrainer on prompts.jsonl, the guard as the reward,
   see :mod:`lorad.training.grpo`) with a callback that streams progress.jsonl, stops with the reason on
   a NaN/Inf loss, and on SIGTERM or the end of the window finishes the step, checkpoints and
   stops (exit 75); SIGINT cancels (exit 76). A new worker on the same directory resumes from
   the last complete checkpoint (optimizer, scheduler and RNG state included);
3. save: health check (finite logits on a held-out batch), then the adapter (whole or not at all);
   under FSDP2 the adapter is first gathered whole from the ranks' shards, written, checked and
   reloaded in one process (:mod:`lorad.training.sharding`), and that reload is what is checked
   and scored;
4. evaluate: held-out metrics of the candidate beside the active adapter (or the bare base);
5. result.json, and the exit code.

:func:`run` reads as those steps (:func:`setup`, :func:`train`, :func:`save`,
:func:`evaluate_candidate`); the checkpoint and adapter protocol is :mod:`lorad.training.checkpoints`,
the Trainer callback, signal flags and rank agreement :mod:`lorad.training.callback`.

Signal handlers only set flags; the training callback acts on them at the next step end.
Under ``accelerate launch`` every rank trains; rank 0 alone writes progress, checkpoints'
markers, the adapter, the metrics and the result. :func:`launch` runs the launcher and exits
as one worker would (a rank killed by a signal: as a worker killed by it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.training import checkpoints
from lorad.training import jobdir as jobfile
from lorad.training.callback import Flags, Progress, barrier, broadcast, make_callback
from lorad.training.jobdir import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_PAUSED, STATUS_BY_EXIT

if TYPE_CHECKING:
    from lorad.training import lora

METHODS = ("sft", "dpo", "kto", "grpo", "sft+grpo")
EARLIER_PHASE = "sft_phase"  # the label (and adapter name) SFT+GRPO's SFT adapter is scored under


class JobFailed(Exception):
    "The job cannot succeed; the message is the reason written to result.json."


def run(job_dir, rank: int | None = None, processes: int | None = None, flags: Flags | None = None) -> int:
    """Run the job in ``job_dir`` to an outcome; returns the exit code (result.json says why).

    Args:
        rank, processes: this rank and the number of ranks; None = the launcher's RANK and
            WORLD_SIZE (accelerate launch). A Ray Train worker passes those of Ray's context.
        flags: set by whoever asks the run to stop; None = this process's SIGTERM and SIGINT
            handlers set them (a Ray Train worker runs this in a thread, where no handler can be
            installed: its flags follow the driver's stop requests).
    """
    job_dir = Path(job_dir)
    spec = jobfile.read_job(job_dir)
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    is_main = rank == 0
    if flags is None:
        flags = Flags()
        signal.signal(signal.SIGTERM, flags.on_sigterm)
        signal.signal(signal.SIGINT, flags.on_sigint)
    progress = Progress(job_dir / jobfile.PROGRESS_FILE, is_main)
    started = time.time()
    result = jobfile.Result(job_id=spec.job_id, method=spec.method, processes=processes)
    try:
        code = _steps(spec, job_dir, flags, progress, result, is_main)
    except JobFailed as e:
        code, result.error = EXIT_FAILED, str(e)
    except Exception as e:  # the worker always reports; the parent decides what next
        code = EXIT_FAILED
        result.error = f"{type(e).__name__}: {e}"
        result.traceback = traceback.format_exc(limit=20)
    result.status = STATUS_BY_EXIT[code]
    result.reason = result.reason or result.error or result.status
    result.wall_seconds = time.time() - started
    result.peak_memory_bytes = _peak_memory_bytes()
    if is_main:
        progress.write(stage=result.status, step=result.steps, total_steps=result.total_steps, reason=result.reason)
        jobfile.write_result(job_dir, result)
    progress.close()
    return code


def _steps(spec, job_dir: Path, flags: Flags, progress: Progress, result: jobfile.Result, is_main: bool) -> int:
    """setup -> train -> save -> evaluate; an exit code other than EXIT_OK from train stops there."""
    progress.write(stage=jobfile.STAGE_PREPARING, step=0, total_steps=None)
    ctx = setup(spec, job_dir, flags, progress, result, is_main)
    outcome = train(ctx, result)
    if isinstance(outcome, int):
        return outcome
    trained = unshard(ctx, outcome) if ctx.sharded else outcome
    if trained is None or not is_main:
        return EXIT_OK
    save(ctx, trained, result)
    evaluate_candidate(ctx, trained, result)
    return EXIT_OK


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every step of one worker run shares (made by :func:`setup`)."""

    spec: jobfile.JobSpec
    job_dir: Path
    flags: Flags
    progress: Progress
    is_main: bool
    model_dir: str
    prec: lora.Precision
    liger: bool
    threads: int
    phases: tuple[str, ...]
    rows: dict  # phase -> its training rows (train.jsonl, or prompts.jsonl for GRPO)
    heldout: list[dict]
    sharded: bool  # FSDP2: every rank holds a shard of each parameter (lorad.training.sharding)

    @property
    def split(self) -> bool:
        """More than one phase (SFT+GRPO): checkpoints and progress are kept per phase."""
        return len(self.phases) > 1


@dataclasses.dataclass
class _Trained:
    """The last phase's model and trainer state, its tokenizer, and SFT+GRPO's SFT adapter
    (where GRPO began). ``staged``: under FSDP2, the adapter already written (gathered) that
    ``model`` was reloaded from in one process; save() installs it instead of writing one."""

    model: Any  # a PeftModel
    state: Any  # the trainer's TrainerState
    tokenizer: Any  # a transformers tokenizer
    earlier: str | None
    staged: Path | None = None


def setup(spec, job_dir: Path, flags: Flags, progress: Progress, result: jobfile.Result, is_main: bool) -> _Run:
    """Everything that can refuse the run, before the first step: the method and its guard, the
    learning rates, the base model (rank 0 converts a GGUF), device and precision, Liger, the
    memory estimate, and the rows to train on."""
    from lorad.training import lora, resources, sharding, speed
    from lorad.training.base_model import BaseModelError, resolve

    threads = speed.configure_threads()  # every core this process may run on, not a constant
    try:
        resources.check_learning_rate(spec.learning_rate)
    except resources.ResourceError as e:
        raise JobFailed(str(e)) from None
    if spec.method not in METHODS:
        raise JobFailed(f"unknown training method {spec.method!r} (expected {', '.join(METHODS)})")
    phases = tuple(spec.method.split("+"))
    if "grpo" in phases and not spec.guard_command:
        raise JobFailed(
            f"method {spec.method} needs a guard command (evaluation.guard_command): its verdict is the GRPO reward"
        )
    if len(phases) > 1:
        try:
            resources.check_learning_rate(phase_schedule(spec, "grpo", True)[1])
        except resources.ResourceError as e:
            raise JobFailed(f"grpo_learning_rate: {e}") from None
    try:
        model_dir = resolve(spec.base_model, spec.state_dir, offline=True) if is_main else None
    except BaseModelError as e:
        raise JobFailed(str(e)) from None
    model_dir = broadcast(model_dir)  # rank 0 converts a GGUF; the others wait and reuse it
    device = resources.detect_device()
    dtype = resources.training_dtype(device, spec.quantization)
    if spec.quantization == "4bit" and dtype != "4bit":
        raise JobFailed('quantization = "4bit" needs CUDA and bitsandbytes; use "auto" or "none"')
    prec = lora.precision(device.kind, dtype, spec.gradient_checkpointing)
    try:
        liger = speed.use_liger(spec.liger_kernel, device.kind)
    except speed.Refused as e:
        raise JobFailed(str(e)) from None
    shape = resources.model_shape(model_dir, spec.lora_r, spec.target_modules, local_files_only=True)
    processes = result.processes or int(os.environ.get("WORLD_SIZE", "1"))  # Ray passes its own
    sharded = sharding.active() and processes > 1
    fit = dict(
        batch_size=spec.batch_size,
        seq_length=spec.max_seq_length,
        dtype=dtype,
        headroom=spec.memory_headroom,
        lora_dropout=spec.lora_dropout > 0,
        shards=processes if sharded else 1,  # the estimate is per rank
        offload=sharded and device.kind == "cuda" and sharding.offloaded(),
    )
    checkpointing = resources.use_checkpointing(shape, device, requested=spec.gradient_checkpointing, **fit)
    prec = dataclasses.replace(prec, gradient_checkpointing=checkpointing)
    try:
        estimate = resources.check_fits(shape, device, gradient_checkpointing=checkpointing, **fit)
    except resources.ResourceError as e:
        raise JobFailed(str(e)) from None
    result.memory_estimate = estimate.as_dict()
    result.device = device.kind
    result.processes = processes
    result.base_model = model_dir

    rows = {
        phase: jobfile.read_jsonl(job_dir / (jobfile.PROMPTS_FILE if phase == "grpo" else jobfile.TRAIN_FILE))
        for phase in phases
    }
    for phase, phase_rows in rows.items():
        if not phase_rows:
            raise JobFailed("there are no prompts to train on" if phase == "grpo" else "the training set is empty")
    return _Run(
        spec,
        job_dir,
        flags,
        progress,
        is_main,
        model_dir,
        prec,
        liger,
        threads,
        phases,
        rows,
        jobfile.read_jsonl(job_dir / jobfile.HELDOUT_FILE),
        sharded,
    )


def train(ctx: _Run, result: jobfile.Result) -> _Trained | int:
    """Every phase in turn, each starting from the adapter the one before left (SFT+GRPO: the
    GRPO phase from the SFT phase's). Returns the last phase's trainer, or the exit code of a
    phase a signal or the window's end stopped (EXIT_PAUSED, EXIT_CANCELLED)."""
    parent = ctx.spec.parent_adapter
    records: list[dict] = []  # one a phase trained
    for phase in ctx.phases[:-1]:
        stop, parent = _earlier_phase(ctx, phase, parent, records, result)
        if stop is not None:
            return stop
    trainer, tokenizer, record, stop = _train_phase(ctx, ctx.phases[-1], parent, ctx.rows[ctx.phases[-1]])
    _account(result, records, record, ctx.split)
    if stop is not None:
        return stop
    return _Trained(trainer.model, trainer.state, tokenizer, parent if ctx.split else None)


def _earlier_phase(
    ctx: _Run, phase: str, parent: str | None, records: list[dict], result: jobfile.Result
) -> tuple[int | None, str | None]:
    """A phase before the last: trained (or found done by an earlier run of this job) and kept
    whole in ``checkpoints/<phase>/adapter`` for the next phase to start from.

    Returns:
        (stop, the adapter the next phase starts from): stop is an exit code when the phase
        was stopped early, else None. The phase's model goes with this frame.
    """
    finished = checkpoints.checkpoint_root(ctx.job_dir, phase) / checkpoints.PHASE_ADAPTER
    if finished.is_dir():  # done in an earlier run of this job
        records.append(json.loads((finished / checkpoints.PHASE_RECORD).read_text()))
        return None, str(finished)
    trainer, _, record, stop = _train_phase(ctx, phase, parent, ctx.rows[phase])
    _account(result, records, record, ctx.split)
    if stop is not None:
        return stop, parent
    state, expected = None, None
    if ctx.sharded:
        from lorad.training import sharding

        expected = sharding.adapter_shapes(trainer.model)
        state = sharding.full_adapter_state(trainer.model)  # a collective: every rank gathers
    if ctx.is_main:
        checkpoints.save_adapter(
            trainer.model, finished, record={checkpoints.PHASE_RECORD: record}, state_dict=state, expected=expected
        )
    barrier()
    return None, str(finished)


def _account(result: jobfile.Result, records: list[dict], record: dict, split: bool) -> None:
    """A phase's record into the job's figures; a phase whose loss diverged fails the job."""
    records.append(record)
    _fold(result, records, split)
    if "failure" in record:
        raise JobFailed(record["failure"])


def unshard(ctx: _Run, trained: _Trained) -> _Trained | None:
    """FSDP2: the adapter gathered whole from the ranks' shards and written by rank 0 (staged,
    not yet the job's adapter), then, once every rank has let go of the sharded model, reloaded
    in one process on rank 0 from that file alone, so that what is checked, scored and handed to
    the gate is exactly what was saved (accelerate #4206, peft #939: a save of one rank's shard
    reads as a smaller adapter, or as the base).

    Returns:
        On rank 0 the reloaded model (``staged`` set); None on the other ranks, whose part ends.

    Raises:
        sharding.AdapterIncomplete: the staged file lacks a LoRA tensor or holds a slice of one.
    """
    from lorad.training import lora, sharding

    expected = sharding.adapter_shapes(trained.model)
    state = sharding.full_adapter_state(trained.model)  # a collective: every rank gathers
    staged = None
    if ctx.is_main:
        staged = checkpoints.stage_adapter(trained.model, ctx.job_dir / jobfile.ADAPTER_DIR, state_dict=state)
    del state
    trained.model = None  # the sharded model goes with the trainer (release() collects them)
    sharding.release()
    barrier()  # every rank has released its shards (rank 0 is about to load the whole model)
    sharding.leave()
    if not ctx.is_main:
        return None
    assert staged is not None
    sharding.check_adapter(staged / sharding.ADAPTER_WEIGHTS, expected)
    base, _ = lora.load_model(ctx.model_dir, ctx.prec, local_files_only=True, whole=True)
    model = lora.load_adapter(base, str(staged))
    return dataclasses.replace(trained, model=model, staged=staged)


def save(ctx: _Run, trained: _Trained, result: jobfile.Result) -> None:
    """Only a healthy adapter is written (finite logits on a held-out batch), whole or not at all."""
    from lorad.evaluation.health import check_finite_logits

    model, state = trained.model, trained.state
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # GRPO's frozen reference (beta > 0) is no part of the result
    health = check_finite_logits(
        model,
        trained.tokenizer,
        ctx.heldout or ctx.rows[ctx.phases[-1]],
        batch_size=ctx.spec.eval_batch_size,
        max_seq_length=ctx.spec.max_seq_length,
    )
    result.health = {"ok": health.ok, "reason": health.reason}
    if not health.ok:
        raise JobFailed(f"health check failed: {health.reason}")
    ctx.progress.write(stage=jobfile.STAGE_SAVING, step=state.global_step, total_steps=state.max_steps)
    final = ctx.job_dir / jobfile.ADAPTER_DIR
    if trained.staged is not None:  # FSDP2: written from the gathered shards, checked and reloaded
        result.adapter = str(checkpoints.install_adapter(trained.staged, final))
    else:
        result.adapter = str(checkpoints.save_adapter(model, final))


def evaluate_candidate(ctx: _Run, trained: _Trained, result: jobfile.Result) -> None:
    """The candidate beside what serves now, on the same held-out rows (SFT+GRPO: and the SFT
    phase's adapter, which becomes the candidate unless GRPO gained)."""
    if not (ctx.spec.evaluate and ctx.heldout):
        return
    model, state = trained.model, trained.state
    ctx.progress.write(stage=jobfile.STAGE_EVALUATING, step=state.global_step, total_steps=state.max_steps)
    result.metrics = metrics = evaluate(model, trained.tokenizer, ctx.heldout, ctx.spec, earlier_phase=trained.earlier)
    if trained.earlier:
        _choose_phase(
            result, metrics, model, trained.tokenizer, ctx.heldout, ctx.spec, Path(trained.earlier), ctx.job_dir
        )


def _choose_phase(
    result: jobfile.Result, metrics: dict, model, tokenizer, heldout_rows, spec, earlier: Path, job_dir: Path
) -> None:
    """SFT+GRPO: the job's candidate is the GRPO phase's adapter only if it gained held-out
    first attempts over the SFT phase's (:func:`lorad.evaluation.gate.keep_last_phase`);
    otherwise the SFT phase's adapter becomes adapter/, with its metrics and health."""
    from lorad.evaluation.gate import keep_last_phase
    from lorad.evaluation.health import check_finite_logits

    sft = metrics.pop(EARLIER_PHASE)
    keep, why = keep_last_phase(sft, metrics["candidate"])
    if result.phases:  # one entry a phase trained
        result.phases[-1] |= {"kept": keep, "decision": why}
    if keep:
        return
    model.set_adapter(EARLIER_PHASE)
    health = check_finite_logits(
        model, tokenizer, heldout_rows, batch_size=spec.eval_batch_size, max_seq_length=spec.max_seq_length
    )
    if not health.ok:
        raise JobFailed(f"health check of the SFT phase's adapter failed: {health.reason}")
    result.health = {"ok": health.ok, "reason": health.reason}
    metrics["candidate"] = sft
    result.adapter = str(checkpoints.adopt_adapter(earlier, job_dir / jobfile.ADAPTER_DIR))


def phase_schedule(spec, phase: str, split: bool) -> tuple[int, float]:
    """(max_steps, learning_rate) of ``phase``: SFT+GRPO's GRPO phase has its own keys."""
    if split and phase == "grpo":
        return spec.grpo_steps, spec.grpo_learning_rate or spec.learning_rate
    return spec.max_steps, spec.learning_rate


def _train_phase(ctx: _Run, phase: str, parent: str | None, rows: list[dict]):
    """Train one phase to its end on a fresh load of the base with the adapter to start from
    (``parent``), resuming from the phase's last complete checkpoint.

    Why a fresh load per phase: SFTTrainer patches the model's forward (its chunked LM head, then
    lorad's completion-only head), which GRPO's sampling must not inherit.

    Returns:
        (trainer, tokenizer, record, stop): record is the phase's figures for result.json (with
        "failure" when the loss or gradient norm became NaN/Inf); stop is EXIT_PAUSED or
        EXIT_CANCELLED when a signal or the window ended the phase early, else None.

    Raises:
        JobFailed: packing refused.
    """
    import torch

    from lorad.training import lora, speed

    spec = ctx.spec
    root = checkpoints.checkpoint_root(ctx.job_dir, phase if ctx.split else None)
    torch.manual_seed(spec.seed)  # every rank draws the same fresh LoRA A matrices
    model, tokenizer = lora.load_model(ctx.model_dir, ctx.prec, local_files_only=True, sharded=ctx.sharded)
    model = lora.attach_adapter(
        model,
        r=spec.lora_r,
        alpha=spec.lora_alpha,
        dropout=spec.lora_dropout,
        target_modules=spec.target_modules,
        parent_adapter=parent,
    )
    max_steps, learning_rate = phase_schedule(spec, phase, ctx.split)
    # packing = true is the SFT phase's; SFT+GRPO's GRPO phase decides as "auto" would.
    setting = "auto" if ctx.split and phase != "sft" else spec.packing
    try:
        packing, packing_reason = speed.decide_packing(setting, phase, model, tokenizer)
    except speed.Refused as e:
        raise JobFailed(str(e)) from None
    train_dataset = lora.dataset(rows, phase)
    staging = root / checkpoints.STAGING
    if ctx.is_main:
        checkpoints.clear_leftovers(root, ctx.job_dir)
    barrier()
    args = lora.training_arguments(
        phase,
        output_dir=str(staging),
        prec=ctx.prec,
        learning_rate=learning_rate,
        max_steps=max_steps,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        grad_accum=spec.grad_accum,
        max_seq_length=spec.max_seq_length,
        save_steps=spec.save_steps,
        seed=spec.seed,
        packing=packing,
        liger=ctx.liger,
        num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length,
        temperature=spec.temperature,
        beta=spec.beta,
    )
    callback = make_callback(
        ctx.flags,
        ctx.progress,
        root,
        spec.window_end,
        ctx.is_main,
        phase=phase if ctx.split else None,
        sharded=ctx.sharded,
    )
    reward = None
    if phase == "grpo":
        from lorad.training.grpo import GuardReward

        reward = GuardReward(spec.guard_command, spec.guard_timeout)
    if ctx.sharded:
        from lorad.training import sharding

        sharding.enable_on_cpu(args)
    trainer = lora.trainer(phase, model, tokenizer, train_dataset, args, [callback], reward=reward)
    # Why after the trainer: trl installs its own LM head in the constructor; this one replaces it.
    completion_head = phase == "sft" and speed.completion_head(trainer.model)
    complete = checkpoints.checkpoints_in(root)
    resume = str(complete[-1]) if complete else None
    t0 = time.monotonic()
    if resume and checkpoints.finished(Path(resume)):
        # Why not trainer.train(): resumed at its last step, the Trainer still runs one more step
        # (past max_steps, on the next epoch's first batch). A worker killed during the adapter
        # save or the evaluation lands here: take the trained weights as they were.
        checkpoints.load_finished(trainer, Path(resume))
        callback.on_step_begin(args, trainer.state, trainer.control)  # records where this run starts
        callback.final_loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
    else:
        with _sampling(trainer.model, tokenizer, phase == "grpo"):
            trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - t0
    state = trainer.state
    record = {
        "method": phase,
        "steps": state.global_step,
        "total_steps": state.max_steps,
        "tokens": state.num_input_tokens_seen,
        "final_loss": callback.final_loss,
        "train_seconds": seconds,
        "new_tokens": state.num_input_tokens_seen - callback.tokens0,
        "resumed_from": resume,
        "speed": {
            "threads": ctx.threads,
            "packing": packing,
            "packing_reason": packing_reason,
            "completion_head": completion_head,
            "liger_kernel": ctx.liger,
            "gradient_checkpointing": ctx.prec.gradient_checkpointing,
        },
    }
    if callback.failure:
        record["failure"] = callback.failure if not ctx.split else f"{phase} phase: {callback.failure}"
    stop = {"pause": EXIT_PAUSED, "cancel": EXIT_CANCELLED}.get(callback.stopped)
    if stop is not None:
        record["reason"] = callback.reason
    return trainer, tokenizer, record, stop


def _fold(result: jobfile.Result, records: list[dict], split: bool) -> None:
    """The job's figures from its phases' records (one phase: its figures are the job's)."""
    if split:
        result.phases = records
    if not records:
        return
    last = records[-1]
    result.steps = sum(r["steps"] for r in records)
    result.total_steps = sum(r["total_steps"] for r in records)
    result.tokens = sum(r["tokens"] for r in records)
    result.train_seconds = sum(r["train_seconds"] for r in records)
    result.tokens_per_s = sum(r["new_tokens"] for r in records) / max(result.train_seconds, 1e-9)
    result.final_loss, result.resumed_from, result.speed = last["final_loss"], last["resumed_from"], last["speed"]
    result.reason = last.get("reason", result.reason)


def _sampling(model, tokenizer, grpo: bool):
    """GRPO's completions end where their first code block does; other methods sample nothing."""
    import contextlib

    if not grpo:
        return contextlib.nullcontext()
    from lorad.training.grpo import stop_after_first_block

    return stop_after_first_block(model, tokenizer)


def evaluate(model, tokenizer, heldout_rows: list[dict], spec, earlier_phase: str | None = None) -> dict:
    """Metrics by label: "candidate", "active" (the reference adapter, or the bare base when
    there is none) and, when set, "previous" and EARLIER_PHASE (SFT+GRPO's SFT adapter)."""
    from lorad.evaluation.metrics import evaluate as score

    adapters: dict[str, str | None] = {"candidate": model.active_adapter}
    for label, path in (
        ("active", spec.reference_adapter),
        ("previous", spec.previous_adapter),
        (EARLIER_PHASE, earlier_phase),
    ):
        if label != "active" and not path:
            continue
        if path:
            model.load_adapter(path, adapter_name=label)
        adapters[label] = label if path else None
    return score(
        model,
        tokenizer,
        heldout_rows,
        adapters=adapters,
        batch_size=spec.eval_batch_size,
        max_seq_length=spec.max_seq_length,
        guard_command=list(spec.guard_command),
        guard_timeout=spec.guard_timeout,
        max_new_tokens=spec.max_new_tokens,
    )


def _peak_memory_bytes() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def launch(job_dir) -> int:
    """Run the job's processes through ``accelerate launch`` and exit as a single worker would.

    The launcher (accelerate's, then torch's elastic agent) runs in this process, in the process
    group of the ranks: a signal to the group reaches every rank directly, one to this process
    alone the agent passes on to them. The exit code is the outcome result.json records (the
    launcher's own is 1 for anything but success, paused included). A rank killed by a signal
    (the OOM killer, kill -9) ends this process with that signal once the agent has stopped the
    other ranks, so the parent treats the run as a killed single worker: paused, resumed from
    its last complete checkpoint, failed after ``schedule.max_worker_kills`` kills in a row.
    """
    job_dir = Path(job_dir)
    spec = jobfile.read_job(job_dir)
    result_path = job_dir / jobfile.RESULT_FILE
    before = result_path.stat().st_mtime_ns if result_path.exists() else None
    rc, killed = _run_launcher(jobfile.launch_command(job_dir, spec))
    if killed is not None:
        rank, signum = killed
        name = signal.Signals(signum).name
        jobfile.write_result(
            job_dir,
            jobfile.Result(
                job_id=spec.job_id,
                status=STATUS_BY_EXIT[EXIT_FAILED],
                reason=f"rank {rank} was killed by signal {signum} ({name})",
                error=f"rank {rank} was killed by signal {signum} ({name}); the other ranks were stopped",
                processes=spec.processes,
            ),
        )
        _die_of(signum)
    result = jobfile.read_result(job_dir)
    if result is None or result_path.stat().st_mtime_ns == before:  # none, or the earlier run's
        if rc != 0:  # no rank got as far as writing a result: say so where the parent looks
            jobfile.write_result(
                job_dir,
                jobfile.Result(
                    job_id=spec.job_id,
                    status=STATUS_BY_EXIT[EXIT_FAILED],
                    reason="launcher failed",
                    error=f"accelerate launch exited with {rc} before a result was written",
                ),
            )
            return EXIT_FAILED
        return EXIT_OK
    codes = {status: code for code, status in STATUS_BY_EXIT.items()}
    return codes.get(result.status, EXIT_FAILED)


def _run_launcher(argv: list[str]) -> tuple[int, tuple[int, int] | None]:
    """Run ``accelerate launch`` (``argv`` as :func:`jobfile.launch_command` gives it) in this
    process until every rank has ended.

    Returns:
        (exit code, (rank, signal) of a rank that died of a signal, else None).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv[argv.index("accelerate.commands.launch") + 1 :])
    try:
        launch_command(args)
    except ChildFailedError as e:  # the agent has stopped the other ranks (with SIGTERM, then SIGKILL)
        # Why the first failure only: the ranks the agent stopped after it died of signals too.
        rank, first = e.get_first_failure()
        return 1, ((rank, -first.exitcode) if first.exitcode < 0 else None)
    except SystemExit as e:  # accelerate's exit on a signal to the agent (128 + the signal), or argv errors
        return (e.code if isinstance(e.code, int) else 1), None
    return 0, None


def _die_of(signum: int) -> None:
    """End this process by ``signum`` (its default action), as the rank it stands for did."""
    sys.stdout.flush()
    sys.stderr.flush()
    if signum not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose action cannot be changed
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # a signal whose default is not to terminate


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launcher = argv[:1] == ["--launch"]
    if launcher:
        argv = argv[1:]
    if len(argv) != 1:
        print("usage: python -m lorad.training.worker [--launch] JOB_DIR", file=sys.stderr)
        return 2
    try:
        return launch(argv[0]) if launcher else run(argv[0])
    except jobfile.JobError as e:
        print(f"lorad worker: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
