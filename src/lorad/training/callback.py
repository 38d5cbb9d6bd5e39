"""The worker's side of a run in motion: signal flags, progress.jsonl, the Trainer callback, and
what the ranks of a distributed run agree on (when to stop, rank 0's values, barriers)."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

from lorad.training import jobdir as jobfile
from lorad.training.checkpoints import publish_checkpoint


class Flags:
    """Set by signal handlers, read by the training callback at step ends."""

    def __init__(self):
        self.stop: str | None = None  # "pause" or "cancel"
        self.reason = ""

    def on_sigterm(self, signum, frame):
        self.stop, self.reason = "pause", "paused on SIGTERM"

    def on_sigint(self, signum, frame):
        self.stop, self.reason = "cancel", "cancelled on SIGINT"


class Progress:
    """Appends one JSON line per record to progress.jsonl (flushed; rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 - closed by close()

    def write(self, **record) -> None:
        if self.file is None:
            return
        record.setdefault("ts", time.time())
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def make_callback(
    flags: Flags,
    progress: Progress,
    root: Path,
    window_end: float | None,
    is_main: bool,
    phase: str | None = None,
    sharded: bool = False,
):
    """The Trainer callback of one phase; checkpoints are published into ``root`` (a
    :func:`checkpoint_root`), and ``phase``, when set, is written on its progress records.
    ``sharded`` (FSDP2): a checkpoint is published only once its adapter files hold every LoRA
    tensor whole (:func:`lorad.training.sharding.check_checkpoint`)."""
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
                write(
                    stage=jobfile.STAGE_TRAINING,
                    step=state.global_step,
                    total_steps=state.max_steps,
                    loss=None,
                    learning_rate=None,
                    tokens_per_s=None,
                    eta_s=None,
                    resumed=state.global_step > 0,
                )
            return control

        def on_step_end(self, args, state, control, **kw):
            if flags.stop is None and window_end is not None and time.time() >= window_end:
                flags.stop, flags.reason = "pause", "paused at the end of the training window"
            stop, reason = agree_on_stop(flags, args.device)
            if state.global_step >= state.max_steps and stop is None:
                # Why no checkpoint at the last step: the adapter is saved right after, and a
                # checkpoint there would only cost time (optimizer state, fsync).
                control.should_save = False
            if stop is not None and self.stopped is None:
                self.stopped, self.reason = stop, reason
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
            write(
                stage=jobfile.STAGE_TRAINING,
                step=state.global_step,
                total_steps=state.max_steps,
                loss=loss,
                learning_rate=logs.get("learning_rate"),
                tokens_per_s=tokens / elapsed,
                eta_s=eta,
                tokens=state.num_input_tokens_seen,
                **extra,
            )
            return control

        def on_save(self, args, state, control, **kw):
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            barrier()  # every rank has written its RNG state into the staged directory
            if is_main and staged.is_dir():
                if sharded:  # a resume must find the whole adapter, never one rank's slice of it
                    from lorad.training.sharding import check_checkpoint

                    check_checkpoint(staged, kw["model"])
                publish_checkpoint(staged, root, state.global_step)
                write(stage=jobfile.STAGE_CHECKPOINTED, step=state.global_step, total_steps=state.max_steps)
            barrier()
            return control

    return Control()


_STOP_CODES = {None: 0, "pause": 1, "cancel": 2}


def agree_on_stop(flags: Flags, device) -> tuple[str | None, str]:
    """Every rank stops at the same step: the strongest request of any rank wins.

    Returns:
        The agreed (stop, reason): what this step end acts on. A request that lands in
        ``flags`` after the all-reduce waits for the next step end on every rank.

    Why: ranks get a signal at slightly different moments; a rank that stopped a step
    earlier than the others would leave them waiting forever in the gradient all-reduce.
    Why a snapshot and not ``flags`` itself after the all-reduce: the flags may be set from
    another thread meanwhile (a Ray Train rank's stop follower), so one rank would act on a
    request the others did not agree on.
    """
    import torch
    import torch.distributed as dist

    mine, why = flags.stop, flags.reason
    if not (dist.is_available() and dist.is_initialized()):
        return mine, why
    code = torch.tensor([_STOP_CODES[mine]], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    agreed = {v: k for k, v in _STOP_CODES.items()}[int(code.item())]
    if agreed == mine:
        return mine, why
    why = "paused on SIGTERM" if agreed == "pause" else "cancelled on SIGINT"
    if _STOP_CODES[agreed] > _STOP_CODES[flags.stop]:  # flags may have grown stronger meanwhile
        flags.stop, flags.reason = agreed, why
    return agreed, why


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(value):
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
