"""FSDP2 under ``accelerate launch``: what a sharded run does that a data-parallel one does not.

With an accelerate config of ``distributed_type: FSDP`` and ``fsdp_version: 2`` each rank holds
a shard of every parameter (the base weights, the LoRA matrices, their gradients and AdamW's
moments), so no rank can read a whole adapter tensor by itself. The trl trainers and
accelerate's FSDP2 plugin train and checkpoint as they do on CUDA; lorad adds:

- :func:`enable_on_cpu`: accelerate turns its FSDP plugin on only for accelerator devices
  (``AcceleratorState`` checks for MULTI_GPU and its kin); on the CPU (gloo) it is let in, so
  the CPU runs the same FSDP2 path (``fully_shard``, accelerate's FSDP checkpoints) as CUDA;
- :func:`full_adapter_state`: the adapter gathered whole before anything is saved
  (``torch.distributed.checkpoint``'s ``get_model_state_dict`` with ``full_state_dict``, on
  every rank; rank 0 receives it). Saving each rank's view instead writes a slice (accelerate
  #4206, peft #939, accelerate #3732);
- :func:`check_adapter`: a saved adapter (the job's, or a checkpoint's) holds every LoRA
  tensor the trained model has, with its whole shape and finite values; the worker then
  reloads it in one process, and only that reloaded adapter is health-checked, scored and
  handed to the gate.

Imported by the worker only; it imports torch lazily.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# accelerate's FULL_STATE_DICT model file in a Trainer checkpoint: what a resume loads.
FSDP_MODEL_FILE = "pytorch_model_fsdp.bin"


class AdapterIncomplete(Exception):
    "A saved adapter lacks LoRA tensors, holds a slice of one, or holds non-finite values."


def active(environ=os.environ) -> bool:
    """The launcher set this rank up for FSDP2 (from the accelerate config's ``distributed_type:
    FSDP`` and ``fsdp_version: 2``)."""
    return environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and environ.get("FSDP_VERSION") == "2"


def offloaded(environ=os.environ) -> bool:
    """FSDP2 keeps the shards in host memory (the accelerate config's ``fsdp_offload_params``)."""
    return environ.get("FSDP_OFFLOAD_PARAMS", "").lower() == "true"


def enable_on_cpu(args) -> None:
    """Let accelerate's FSDP2 plugin in on the CPU; call it just before the Trainer is built.

    ``TrainingArguments(use_cpu=True)`` sets the gloo process group up as MULTI_CPU, and
    accelerate's ``AcceleratorState`` enables the FSDP plugin only for an accelerator's type
    (MULTI_GPU and its kin). Marked MULTI_GPU, the Trainer's Accelerator enables FSDP (and, as
    on CUDA, records FSDP as the type, which later AcceleratorState objects copy); the device
    and the backend stay the CPU's and gloo. ``fully_shard``, the collectives FSDP2 runs and
    accelerate's FSDP checkpoints all work on gloo: this is how the CPU runs, and its tests
    exercise, the FSDP2 path CUDA takes. Off the CPU it does nothing.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    args.device  # noqa: B018 - TrainingArguments creates the process group (PartialState) here
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU


def adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Each trainable LoRA tensor of ``model`` under the name peft saves it by, with its whole
    shape (a sharded parameter is a DTensor, whose shape is the global one)."""
    names = {}
    adapter = getattr(model, "active_adapter", "default")
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name:
            names[saved_name(name, adapter)] = tuple(param.shape)
    return names


def saved_name(name: str, adapter: str = "default") -> str:
    """The key peft's save_pretrained writes for a parameter name: without the adapter's name
    (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``), as peft does."""
    return name.replace(f".{adapter}", "")


def full_adapter_state(model) -> dict:
    """The adapter's tensors, whole, on CPU, on rank 0 ({} on the other ranks).

    A collective: every rank must call it at the same point. Keys are the model's parameter
    names (peft's ``save_pretrained(state_dict=...)`` takes them as they are).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload with full_state_dict: rank 0 alone materialises the gathered tensors (on CPU),
    # so no rank ever holds the whole model; ignore_frozen_params: the base is not gathered.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if "lora_" in k}


def check_adapter(weights: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """``weights`` (a safetensors or torch file) holds every tensor of ``expected`` (by peft's
    saved names, see :func:`adapter_shapes`) with that shape, and only finite values.

    Raises:
        AdapterIncomplete: naming what is missing or cut, with the first few names.
    """
    import torch

    if not expected:
        raise AdapterIncomplete(f"{weights}: the trained model has no LoRA tensors to check against")
    tensors = _load(weights)
    found = {saved_name(k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    cut = sorted(k for k in expected if k in found and tuple(found[k].shape) != expected[k])
    bad = sorted(k for k in expected if k in found and not torch.isfinite(found[k].float()).all())
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} LoRA tensors missing ({', '.join(missing[:3])})")
    if cut:
        k = cut[0]
        problems.append(f"{len(cut)} with a partial shape ({k}: {tuple(found[k].shape)}, the model's is {expected[k]})")
    if bad:
        problems.append(f"{len(bad)} with non-finite values ({', '.join(bad[:3])})")
    if problems:
        raise AdapterIncomplete(f"{weights}: " + "; ".join(problems))


def _load(weights: Path) -> dict:
    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(weights)
    return torch.load(weights, map_location="cpu", weights_only=True)


def check_checkpoint(checkpoint: Path, model) -> None:
    """A checkpoint the Trainer wrote under FSDP2 holds the whole adapter: the adapter file lorad
    reads at a finished checkpoint, and accelerate's FULL_STATE_DICT file a resume loads.

    Raises:
        AdapterIncomplete: either file is missing a tensor or holds a slice of one.
    """
    expected = adapter_shapes(model)
    for name in (ADAPTER_WEIGHTS, FSDP_MODEL_FILE):
        check_adapter(checkpoint / name, expected)


def release() -> None:
    """Return what the trained, sharded model held (host and device memory) before the one-process
    reload: the trainer must already be unreferenced."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


def leave() -> None:
    """End this rank's part in the process group (after the last collective of the run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
