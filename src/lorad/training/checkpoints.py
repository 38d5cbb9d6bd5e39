"""What a worker leaves on disk, whole or not at all: checkpoints and the adapter directory.

A checkpoint is trusted only as ``checkpoints/[<phase>/]step-N/`` holding ``lorad-checkpoint.json``:
the Trainer writes into ``.staging/`` first, and a staged directory is renamed into place only
after every file in it was fsynced and the marker written (:func:`publish_checkpoint`), so a
worker killed at any moment leaves a complete checkpoint or a staging directory nobody reads.
Directories go by rename first (:func:`discard`); the adapter (and a finished phase's adapter)
is written under a temporary name and renamed (:func:`save_adapter`). :func:`clear_leftovers`
removes what a killed run left half-made.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lorad import durable
from lorad.training import jobdir

STAGING = ".staging"
CHECKPOINT_MARKER = "lorad-checkpoint.json"
DISCARDED = ".discarded-"  # prefix of directories being deleted (see discard())
KEEP_CHECKPOINTS = 2
# A job of phases: checkpoints/<phase>/adapter is the phase's adapter once the phase is done,
# with its figures in PHASE_RECORD; the next phase starts from it (and a resume skips the phase).
PHASE_ADAPTER = "adapter"
PHASE_RECORD = "lorad-phase.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def checkpoint_root(job_dir, phase: str | None = None) -> Path:
    """``checkpoints/``, or ``checkpoints/<phase>/`` for a phase of a job of several."""
    root = Path(job_dir) / jobdir.CHECKPOINTS_DIR
    return root / phase if phase else root


def complete_checkpoints(job_dir, phase: str | None = None) -> list[Path]:
    """Checkpoints a resume may trust, oldest first: ``checkpoints/[<phase>/]step-N`` with the marker.

    A directory is only ever renamed to step-N after every file in it was fsynced and the
    marker written, so a worker killed at any moment leaves either a complete checkpoint or
    a staging directory that is never looked at.
    """
    return checkpoints_in(checkpoint_root(job_dir, phase))


def checkpoints_in(root: Path) -> list[Path]:
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
    for old in checkpoints_in(root)[:-KEEP_CHECKPOINTS]:
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


def finished(checkpoint: Path) -> bool:
    """The checkpoint is the run's last step (training itself is done)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state.get("max_steps", 0) > 0 and state["global_step"] >= state["max_steps"]


def load_finished(trainer, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    set_peft_model_state_dict(trainer.model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))


def clear_leftovers(root: Path, job_dir: Path) -> Path:
    """Remove what a killed run left half-made (staging, a half-discarded directory, a half-saved
    adapter) and return an empty staging directory under ``root`` for the Trainer."""
    staging = root / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    for doomed in (
        *root.glob(DISCARDED + "*"),
        *root.glob(".adapter.*"),
        *job_dir.glob(DISCARDED + "*"),
        *job_dir.glob(".adapter.*"),
    ):
        shutil.rmtree(doomed, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def save_adapter(
    model,
    final: Path,
    record: dict[str, dict] | None = None,
    *,
    state_dict: dict | None = None,
    expected: dict[str, tuple[int, ...]] | None = None,
) -> Path:
    """``final``/ with adapter_config.json and adapter_model.safetensors (and ``record``'s
    JSON files, by name), appearing whole or not at all. (The registry hashes the files when
    the adapter becomes a version.)

    Args:
        state_dict: the adapter's tensors when the model's own are shards (FSDP2: gathered by
            :func:`lorad.training.sharding.full_adapter_state`); None = the model's.
        expected: when set, the written file must hold these tensors whole
            (:func:`lorad.training.sharding.check_adapter`) before it is installed.
    """
    tmp = stage_adapter(model, final, record, state_dict=state_dict)
    if expected is not None:
        from lorad.training import sharding

        sharding.check_adapter(tmp / "adapter_model.safetensors", expected)
    return install_adapter(tmp, final)


def stage_adapter(model, final: Path, record: dict[str, dict] | None = None, *, state_dict: dict | None = None) -> Path:
    """The adapter written into a temporary directory beside ``final`` (:func:`install_adapter`
    moves it into place; :func:`clear_leftovers` removes one a killed run left)."""
    tmp = _staged_adapter(final)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    (tmp / "README.md").unlink(missing_ok=True)  # peft's model-card stub; lorad.json says more
    for name, data in (record or {}).items():
        (tmp / name).write_text(json.dumps(data) + "\n")
    return tmp


def adopt_adapter(source: Path, final: Path) -> Path:
    """``final``/ as a copy of the adapter files in ``source``/, whole or not at all."""
    tmp = _staged_adapter(final)
    for name in ADAPTER_FILES:
        shutil.copy2(source / name, tmp / name)
    return install_adapter(tmp, final)


def _staged_adapter(final: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=final.parent))
    os.chmod(tmp, 0o750)  # mkdtemp's 0700, opened to the group (a vLLM server in the lorad group)
    return tmp


def install_adapter(tmp: Path, final: Path) -> Path:
    """Move a staged adapter directory into place as ``final`` (fsynced; an old one discarded)."""
    durable.fsync_tree(tmp)
    if final.exists():
        discard(final)
    os.rename(tmp, final)
    durable.fsync(final.parent)
    return final
