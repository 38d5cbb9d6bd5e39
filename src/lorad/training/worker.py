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
4. evaluate: held-out metrics of the candidate beside the active adapter (or the bare base);
5. result.json, and the exit code.

Signal handlers only set flags; the training callback acts on them at the next step end.
Under ``accelerate launch`` every rank trains; rank 0 alone writes progress, checkpoints'
markers, the adapter, the metrics and the result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from lorad import durable
from lorad.training import jobdir as jobfile
from lorad.training.jobdir import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, EXIT_PAUSED, STATUS_BY_EXIT

STAGING = ".staging"
CHECKPOINT_MARKER = "lorad-checkpoint.json"
DISCARDED = ".discarded-"  # prefix of directories being deleted (see discard())
KEEP_CHECKPOINTS = 2
# A job of phases: checkpoints/<phase>/adapter is the phase's adapter once the phase is done,
# with its figures in PHASE_RECORD; the next phase starts from it (and a resume skips the phase).
PHASE_ADAPTER = "adapter"
PHASE_RECORD = "lorad-phase.json"
METHODS = ("sft", "dpo", "kto", "grpo", "sft+grpo")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EARLIER_PHASE = "sft_phase"  # the label (and adapter name) SFT+GRPO's SFT adapter is scored under


class JobFailed(Exception):
    "The job cannot succeed; the message is the reason written to result.json."


class Flags:
    """Set by signal handlers, read by the training callback at step ends."""

    def __init__(self):
        self.stop: str | None = None  # "pause" or "cancel"
        self.reason = ""

    def on_sigterm(self, signum, frame):
        self.stop, self.reason = "pause", "paused on SIGTERM"

    def on_sigint(self, signum, frame):
        self.stop, self.reason = "cancel", "cancelled on SIGINT"


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_root(job_dir, phase: str | None = None) -> Path:
    """``checkpoints/``, or ``checkpoints/<phase>/`` for a phase of a job of several."""
    root = Path(job_dir) / jobfile.CHECKPOINTS_DIR
    return root / phase if phase else root


def complete_checkpoints(job_dir, phase: str | None = None) -> list[Path]:
    """Checkpoints a resume may trust, oldest first: ``checkpoints/[<phase>/]step-N`` with the marker.

    A directory is only ever renamed to step-N after every file in it was fsynced and the
    marker written, so a worker killed at any moment leaves either a complete checkpoint or
    a staging directory that is never looked at.
    """
    return _checkpoints_in(checkpoint_root(job_dir, phase))


def _checkpoints_in(root: Path) -> list[Path]:
    found = []
    for d in root.glob("step-*") if root.is_dir() else ():
        try:
            step = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if (d / CHECKPOINT_MARKER).is_file():
            found.append((step, d))
    return [d for _, d in sorted(found)]


def publish_checkpoint(staged: Path, root: Path, step: int) -> Path:
    """Make a checkpoint the Trainer wrote in staging complete: fsync, marker, rename into
    ``root`` (a :func:`checkpoint_root`)."""
    (staged / CHECKPOINT_MARKER).write_text(json.dumps({"step": step, "ts": time.time()}) + "\n")
    durable.fsync_tree(staged)
    final = root / f"step-{step}"
    if final.exists():  # a stale one from before a resume at an earlier step
        discard(final)
    os.rename(staged, final)
    durable.fsync(final.parent)
    for old in _checkpoints_in(root)[:-KEEP_CHECKPOINTS]:
        discard(old)
    return final


def discard(path: Path) -> None:
    """Remove a directory so that a kill at any moment leaves it whole or gone from view.

    Why rename first: rmtree deletes file by file, and a kill half way would leave a
    checkpoint with its marker but without its weights (the fault suite caught exactly that).
    """
    doomed = path.with_name(DISCARDED + path.name)
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    durable.fsync(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _finished(checkpoint: Path) -> bool:
    """The checkpoint is the run's last step (training itself is done)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def _load_finished_checkpoint(trainer, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


# -- progress and result -----------------------------------------------------------------------


class Progress:
    """Appends one JSON line per record to progress.jsonl (flushed; rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, **record) -> None:
        if self.file is None:
            return
        record.setdefault("ts", time.time())
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _peak_memory_bytes() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    except Exception:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def save_adapter(model, final: Path, record: dict[str, dict] | None = None) -> Path:
    """``final``/ with adapter_config.json and adapter_model.safetensors (and ``record``'s
    JSON files, by name), appearing whole or not at all. (The registry hashes the files when
    the adapter becomes a version.)"""
    tmp = _staged_adapter(final)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card stub; lorad.json says more
    for name, data in (record or {}).items():
        (tmp / name).write_text(json.dumps(data) + "\n")
    return _install_adapter(tmp, final)


def adopt_adapter(source: Path, final: Path) -> Path:
    """``final``/ as a copy of the adapter files in ``source``/, whole or not at all."""
    tmp = _staged_adapter(final)
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, tmp / name)
    return _install_adapter(tmp, final)


def _staged_adapter(final: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=final.parent))
    os.chmod(tmp, 0o750)  # mkdtemp's 0700, opened to the group (a vLLM server in the lorad group)
    return tmp


def _install_adapter(tmp: Path, final: Path) -> Path:
    durable.fsync_tree(tmp)
    if final.exists():
        discard(final)
    os.rename(tmp, final)
    durable.fsync(final.parent)
    return final


# -- the training callback ---------------------------------------------------------------------


def make_callback(flags: Flags, progress: Progress, root: Path, window_end: float | None,
                  is_main: bool, phase: str | None = None):
    """The Trainer callback of one phase; checkpoints are published into ``root`` (a
    :func:`checkpoint_root`), and ``phase``, when set, is written on its progress records."""
    from transformers import TrainerCallback

    write = functools.partial(progress.write, phase=phase) if phase else progress.write

    class Control(TrainerCallback):
        """Progress lines, NaN/Inf detection, pause/cancel at step ends, checkpoint publishing."""

        def __init__(self):
            self.failure: str | None = None
            self.stopped: str | None = None  # "pause" or "cancel"
            self.reason = ""
            self.final_loss: float | None = None
            self.t0 = time.monotonic()
            self.step0: int | None = None
            self.tokens0 = 0

        def on_step_begin(self, args, state, control, **kw):
            # Why here and not in on_train_begin: on a resume the Trainer restores its state
            # (step, tokens seen) only after on_train_begin has run.
            if self.step0 is None:
                self.t0 = time.monotonic()
                self.step0 = state.global_step
                self.tokens0 = state.num_input_tokens_seen
                write(stage=jobfile.STAGE_TRAINING, step=state.global_step, total_steps=state.max_steps,
                      loss=None, learning_rate=None, tokens_per_s=None, eta_s=None,
                      resumed=state.global_step > 0)
            return control

        def on_step_end(self, args, state, control, **kw):
            if flags.stop is None and window_end is not None and time.time() >= window_end:
                flags.stop, flags.reason = "pause", "paused at the end of the training window"
            _agree_on_stop(flags, args.device)
            if state.global_step >= state.max_steps and flags.stop is None:
                # Why no checkpoint at the last step: the adapter is saved right after, and a
                # checkpoint there would only cost time (optimizer state, fsync).
                control.should_save = False
            if flags.stop is not None and self.stopped is None:
                self.stopped, self.reason = flags.stop, flags.reason
                control.should_training_stop = True
                # Why save on cancel too: it costs one checkpoint and lets an operator resume.
                control.should_save = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                return control
            loss = float(logs["loss"])
            grad = logs.get("grad_norm")
            if not math.isfinite(loss) or (grad is not None and not math.isfinite(float(grad))):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                value = loss if what == "loss" else float(grad)
                self.failure = f"{what} became {value} at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = False  # never checkpoint a diverged state
                return control
            self.final_loss = loss
            elapsed = max(time.monotonic() - self.t0, 1e-9)
            done = state.global_step - (self.step0 or 0)
            tokens = state.num_input_tokens_seen - self.tokens0
            eta = (state.max_steps - state.global_step) * elapsed / done if done else None
            extra = {"reward": logs["reward"]} if "reward" in logs else {}  # GRPO: mean guard verdict
            write(stage=jobfile.STAGE_TRAINING, step=state.global_step, total_steps=state.max_steps,
                  loss=loss, learning_rate=logs.get("learning_rate"), tokens_per_s=tokens / elapsed, eta_s=eta,
                  tokens=state.num_input_tokens_seen, **extra)
            return control

        def on_save(self, args, state, control, **kw):
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _barrier()  # every rank has written its RNG state into the staged directory
            if is_main and staged.is_dir():
                publish_checkpoint(staged, root, state.global_step)
                write(stage=jobfile.STAGE_CHECKPOINTED, step=state.global_step, total_steps=state.max_steps)
            _barrier()
            return control

    return Control()


_STOP_CODES = {None: 0, "pause": 1, "cancel": 2}


def _agree_on_stop(flags: Flags, device) -> None:
    """Every rank stops at the same step: the strongest request of any rank wins.

    Why: ranks get a signal at slightly different moments; a rank that stopped a step
    earlier than the others would leave them waiting forever in the gradient all-reduce.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    code = torch.tensor([_STOP_CODES[flags.stop]], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    agreed = {v: k for k, v in _STOP_CODES.items()}[int(code.item())]
    if agreed != flags.stop and agreed is not None:
        flags.stop = agreed
        flags.reason = "paused on SIGTERM" if agreed == "pause" else "cancelled on SIGINT"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- the run -----------------------------------------------------------------------------------


def run(job_dir) -> int:
    """Run the job in ``job_dir`` to an outcome; returns the exit code (result.json says why)."""
    job_dir = Path(job_dir)
    spec = jobfile.read_job(job_dir)
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    flags = Flags()
    signal.signal(signal.SIGTERM, flags.on_sigterm)
    signal.signal(signal.SIGINT, flags.on_sigint)
    progress = Progress(job_dir / jobfile.PROGRESS_FILE, is_main)
    started = time.time()
    result = jobfile.Result(job_id=spec.job_id, method=spec.method)
    try:
        code = _run(spec, job_dir, flags, progress, result, is_main)
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
        progress.write(stage=result.status, step=result.steps, total_steps=result.total_steps,
                       reason=result.reason)
        jobfile.write_result(job_dir, result)
    progress.close()
    return code


def _run(spec, job_dir: Path, flags: Flags, progress: Progress, result: jobfile.Result, is_main: bool) -> int:
    import torch

    from lorad.evaluation.health import check_finite_logits
    from lorad.training import lora, resources, speed
    from lorad.training.base_model import BaseModelError, resolve

    # -- setup: everything that can refuse the run comes before the first step
    progress.write(stage=jobfile.STAGE_PREPARING, step=0, total_steps=None)
    threads = speed.configure_threads()  # every core this process may run on, not a constant
    try:
        resources.check_learning_rate(spec.learning_rate)
    except resources.ResourceError as e:
        raise JobFailed(str(e)) from None
    if spec.method not in METHODS:
        raise JobFailed(f"unknown training method {spec.method!r} (expected {', '.join(METHODS)})")
    phases = tuple(spec.method.split("+"))
    if "grpo" in phases and not spec.guard_command:
        raise JobFailed(f"method {spec.method} needs a guard command (evaluation.guard_command): its verdict "
                        f"is the GRPO reward")
    if len(phases) > 1:
        try:
            resources.check_learning_rate(phase_schedule(spec, "grpo", True)[1])
        except resources.ResourceError as e:
            raise JobFailed(f"grpo_learning_rate: {e}") from None
    try:
        model_dir = resolve(spec.base_model, spec.state_dir, offline=True) if is_main else None
    except BaseModelError as e:
        raise JobFailed(str(e)) from None
    model_dir = _broadcast(model_dir)  # rank 0 converts a GGUF; the others wait and reuse it
    device = resources.detect_device()
    dtype = resources.training_dtype(device, spec.quantization)
    if spec.quantization == "4bit" and dtype != "4bit":
        raise JobFailed("quantization = \"4bit\" needs CUDA and bitsandbytes; use \"auto\" or \"none\"")
    prec = lora.precision(device.kind, dtype, spec.gradient_checkpointing)
    try:
        liger = speed.use_liger(spec.liger_kernel, device.kind)
    except speed.Refused as e:
        raise JobFailed(str(e)) from None
    shape = resources.model_shape(model_dir, spec.lora_r, spec.target_modules,
                                  local_files_only=True)
    fit = dict(batch_size=spec.batch_size, seq_length=spec.max_seq_length, dtype=dtype,
               headroom=spec.memory_headroom, lora_dropout=spec.lora_dropout > 0)
    checkpointing = resources.use_checkpointing(shape, device, requested=spec.gradient_checkpointing, **fit)
    prec = dataclasses.replace(prec, gradient_checkpointing=checkpointing)
    try:
        estimate = resources.check_fits(shape, device, gradient_checkpointing=checkpointing, **fit)
    except resources.ResourceError as e:
        raise JobFailed(str(e)) from None
    result.memory_estimate = estimate.as_dict()
    result.device = device.kind
    result.processes = int(os.environ.get("WORLD_SIZE", "1"))
    result.base_model = model_dir

    phase_rows = {phase: jobfile.read_jsonl(job_dir / (jobfile.PROMPTS_FILE if phase == "grpo" else jobfile.TRAIN_FILE))
                  for phase in phases}
    heldout_rows = jobfile.read_jsonl(job_dir / jobfile.HELDOUT_FILE)
    for phase, rows in phase_rows.items():
        if not rows:
            raise JobFailed("there are no prompts to train on" if phase == "grpo" else "the training set is empty")
    ctx = _Run(spec, job_dir, flags, progress, is_main, prec, liger, threads, split=len(phases) > 1)

    # -- train, phase by phase (SFT+GRPO: the GRPO phase starts from the SFT phase's adapter)
    parent, records = spec.parent_adapter, []
    for phase in phases:
        root = checkpoint_root(job_dir, phase if ctx.split else None)
        finished = root / PHASE_ADAPTER
        if phase != phases[-1] and finished.is_dir():  # done in an earlier run of this job
            records.append(json.loads((finished / PHASE_RECORD).read_text()))
            parent = str(finished)
            continue
        torch.manual_seed(spec.seed)
        model, tokenizer = lora.load_model(model_dir, prec, local_files_only=True)
        model = lora.attach_adapter(model, r=spec.lora_r, alpha=spec.lora_alpha, dropout=spec.lora_dropout,
                                    target_modules=spec.target_modules, parent_adapter=parent)
        trainer, record, stop = _train_phase(ctx, phase, root, model, tokenizer, phase_rows[phase])
        records.append(record)
        _fold(result, records, ctx.split)
        if "failure" in record:
            raise JobFailed(record["failure"])
        if stop is not None:
            return stop
        if phase != phases[-1]:
            if is_main:
                save_adapter(trainer.model, finished, record={PHASE_RECORD: record})
            _barrier()
            parent = str(finished)
            del trainer, model
    if not is_main:
        return EXIT_OK
    earlier = parent if ctx.split else None  # the SFT phase's adapter, where the GRPO phase began

    # -- save: only a healthy adapter is written
    model, state = trainer.model, trainer.state
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # GRPO's frozen reference (beta > 0) is no part of the result
    health = check_finite_logits(model, tokenizer, heldout_rows or phase_rows[phases[-1]],
                                 batch_size=spec.eval_batch_size, max_seq_length=spec.max_seq_length)
    result.health = {"ok": health.ok, "reason": health.reason}
    if not health.ok:
        raise JobFailed(f"health check failed: {health.reason}")
    progress.write(stage=jobfile.STAGE_SAVING, step=state.global_step, total_steps=state.max_steps)
    result.adapter = str(save_adapter(model, job_dir / jobfile.ADAPTER_DIR))

    # -- evaluate the candidate beside what serves now, on the same held-out rows
    if spec.evaluate and heldout_rows:
        progress.write(stage=jobfile.STAGE_EVALUATING, step=state.global_step, total_steps=state.max_steps)
        result.metrics = evaluate(model, tokenizer, heldout_rows, spec, earlier_phase=earlier)
        if earlier:
            _choose_phase(result, model, tokenizer, heldout_rows, spec, Path(earlier), job_dir)
    return EXIT_OK


def _choose_phase(result: jobfile.Result, model, tokenizer, heldout_rows, spec, earlier: Path, job_dir: Path) -> None:
    """SFT+GRPO: the job's candidate is the GRPO phase's adapter only if it gained held-out
    first attempts over the SFT phase's (:func:`lorad.evaluation.gate.keep_last_phase`);
    otherwise the SFT phase's adapter becomes adapter/, with its metrics and health."""
    from lorad.evaluation.gate import keep_last_phase
    from lorad.evaluation.health import check_finite_logits

    sft = result.metrics.pop(EARLIER_PHASE)
    keep, why = keep_last_phase(sft, result.metrics["candidate"])
    result.phases[-1] |= {"kept": keep, "decision": why}
    if keep:
        return
    model.set_adapter(EARLIER_PHASE)
    health = check_finite_logits(model, tokenizer, heldout_rows, batch_size=spec.eval_batch_size,
                                 max_seq_length=spec.max_seq_length)
    if not health.ok:
        raise JobFailed(f"health check of the SFT phase's adapter failed: {health.reason}")
    result.health = {"ok": health.ok, "reason": health.reason}
    result.metrics["candidate"] = sft
    result.adapter = str(adopt_adapter(earlier, job_dir / jobfile.ADAPTER_DIR))


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every phase of one worker run shares."""

    spec: jobfile.JobSpec
    job_dir: Path
    flags: Flags
    progress: Progress
    is_main: bool
    prec: object  # lora.Precision
    liger: bool
    threads: int
    split: bool  # more than one phase (SFT+GRPO): checkpoints and progress are kept per phase


def phase_schedule(spec, phase: str, split: bool) -> tuple[int, float]:
    """(max_steps, learning_rate) of ``phase``: SFT+GRPO's GRPO phase has its own keys."""
    if split and phase == "grpo":
        return spec.grpo_steps, spec.grpo_learning_rate or spec.learning_rate
    return spec.max_steps, spec.learning_rate


def _train_phase(ctx: _Run, phase: str, root: Path, model, tokenizer, rows: list[dict]):
    """Train one phase to its end (resuming from its last complete checkpoint).

    Returns:
        (trainer, record, stop): record is the phase's figures for result.json (with
        "failure" when the loss or gradient norm became NaN/Inf); stop is EXIT_PAUSED or
        EXIT_CANCELLED when a signal or the window ended the phase early, else None.

    Raises:
        JobFailed: packing refused.
    """
    from lorad.training import lora, speed

    spec = ctx.spec
    max_steps, learning_rate = phase_schedule(spec, phase, ctx.split)
    # packing = true is the SFT phase's; SFT+GRPO's GRPO phase decides as "auto" would.
    setting = "auto" if ctx.split and phase != "sft" else spec.packing
    try:
        packing, packing_reason = speed.decide_packing(setting, phase, model, tokenizer)
    except speed.Refused as e:
        raise JobFailed(str(e)) from None
    train_dataset = lora.dataset(rows, phase)
    staging = root / STAGING
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)  # a killed save leaves only this behind
        for doomed in (*root.glob(DISCARDED + "*"), *root.glob(".adapter.*"), *ctx.job_dir.glob(DISCARDED + "*"),
                       *ctx.job_dir.glob(".adapter.*")):
            shutil.rmtree(doomed, ignore_errors=True)  # and a killed discard() or adapter save this
        staging.mkdir(parents=True, exist_ok=True)
    _barrier()
    args = lora.training_arguments(
        phase, output_dir=str(staging), prec=ctx.prec, learning_rate=learning_rate,
        max_steps=max_steps, epochs=spec.epochs, batch_size=spec.batch_size,
        grad_accum=spec.grad_accum, max_seq_length=spec.max_seq_length, save_steps=spec.save_steps,
        seed=spec.seed, packing=packing, liger=ctx.liger, num_generations=spec.num_generations,
        max_completion_length=spec.max_completion_length, temperature=spec.temperature, beta=spec.beta)
    callback = make_callback(ctx.flags, ctx.progress, root, spec.window_end, ctx.is_main,
                             phase=phase if ctx.split else None)
    reward = None
    if phase == "grpo":
        from lorad.training.grpo import GuardReward

        reward = GuardReward(spec.guard_command, spec.guard_timeout)
    trainer = lora.trainer(phase, model, tokenizer, train_dataset, args, [callback], reward=reward)
    # Why after the trainer: trl installs its own LM head in the constructor; this one replaces it.
    completion_head = phase == "sft" and speed.completion_head(trainer.model)
    checkpoints = _checkpoints_in(root)
    resume = str(checkpoints[-1]) if checkpoints else None
    t0 = time.monotonic()
    if resume and _finished(Path(resume)):
        # Why not trainer.train(): resumed at its last step, the Trainer still runs one more step
        # (past max_steps, on the next epoch's first batch). A worker killed during the adapter
        # save or the evaluation lands here: take the trained weights as they were.
        _load_finished_checkpoint(trainer, Path(resume))
        callback.on_step_begin(args, trainer.state, trainer.control)  # records where this run starts
        callback.final_loss = next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)
    else:
        with _sampling(trainer.model, tokenizer, phase == "grpo"):
            trainer.train(resume_from_checkpoint=resume)
    seconds = time.monotonic() - t0
    state = trainer.state
    record = {"method": phase, "steps": state.global_step, "total_steps": state.max_steps,
              "tokens": state.num_input_tokens_seen, "final_loss": callback.final_loss,
              "train_seconds": seconds, "new_tokens": state.num_input_tokens_seen - callback.tokens0,
              "resumed_from": resume,
              "speed": {"threads": ctx.threads, "packing": packing, "packing_reason": packing_reason,
                        "completion_head": completion_head, "liger_kernel": ctx.liger,
                        "gradient_checkpointing": ctx.prec.gradient_checkpointing}}
    if callback.failure:
        record["failure"] = callback.failure if not ctx.split else f"{phase} phase: {callback.failure}"
    stop = {"pause": EXIT_PAUSED, "cancel": EXIT_CANCELLED}.get(callback.stopped)
    if stop is not None:
        record["reason"] = callback.reason
    return trainer, record, stop


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
    for label, path in (("active", spec.reference_adapter), ("previous", spec.previous_adapter),
                        (EARLIER_PHASE, earlier_phase)):
        if label != "active" and not path:
            continue
        if path:
            model.load_adapter(path, adapter_name=label)
        adapters[label] = label if path else None
    return score(model, tokenizer, heldout_rows, adapters=adapters, batch_size=spec.eval_batch_size,
                 max_seq_length=spec.max_seq_length, guard_command=list(spec.guard_command),
                 guard_timeout=spec.guard_timeout,
                 max_new_tokens=spec.max_new_tokens)


def _broadcast(value):
    """Rank 0's value on every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            from accelerate import PartialState

            PartialState()  # initialises the process group from the launcher's environment
        else:
            return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(job_dir) -> int:
    """Run the job's processes through ``accelerate launch`` and exit as a single worker would.

    The launcher is in this process group, so a signal to the group reaches every rank
    directly; a signal to this process alone is forwarded to the launcher (which passes it on
    to the ranks). The exit code is the outcome result.json records (the launcher's own is
    1 for anything but success, paused included).
    """
    import subprocess

    job_dir = Path(job_dir)
    spec = jobfile.read_job(job_dir)
    result_path = job_dir / jobfile.RESULT_FILE
    before = result_path.stat().st_mtime_ns if result_path.exists() else None
    proc = subprocess.Popen(jobfile.launch_command(job_dir, spec))

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = proc.wait()
    result = jobfile.read_result(job_dir)
    fresh = result is not None and result_path.stat().st_mtime_ns != before
    if not fresh:
        if rc != 0:  # no rank got as far as writing a result: say so where the parent looks
            jobfile.write_result(job_dir, jobfile.Result(
                job_id=spec.job_id, status=STATUS_BY_EXIT[EXIT_FAILED], reason="launcher failed",
                error=f"accelerate launch exited with {rc} before a result was written"))
            return EXIT_FAILED
        return EXIT_OK
    codes = {status: code for code, status in STATUS_BY_EXIT.items()}
    return codes.get(result.status, EXIT_FAILED)


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
