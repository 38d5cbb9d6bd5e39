"""The device a run will use, what the run needs, and whether it fits.

The checks here run before any training step ("before any GPU time"): a learning rate
outside the sane range is an error, never a silent clamp; a run whose memory estimate
exceeds what the device has is refused with a suggested batch size and sequence length that
would fit.

The estimate (bytes) for a LoRA run is the sum of:

- base weights: parameters x bytes per parameter (fp32 4, bf16 2, 4-bit about 0.56 with the
  quantization constants);
- LoRA parameters, their gradients and AdamW's two moments: 4 x 4 bytes each (kept in fp32);
- activations kept for the backward pass: per token and layer ACTIVATION_FACTOR x hidden values
  (measured with bench/memory.py on SmolLM2-135M's shape: 34 with LoRA dropout, whose dropped
  copies of each adapted layer's input are a third of it, 24 without); with gradient
  checkpointing only each layer's input (CHECKPOINTED_FACTOR = 2 x hidden per layer) plus one
  layer recomputed at a time;
- the LM head: trl's and lorad's heads are chunked (``lorad.training.speed``), so the logits over
  the vocabulary are never held whole: HEAD_TILES tiles of (tokens, up to 4,096) x (vocabulary, up
  to 32,768) fp32 values at the peak of its backward (measured: 9.4 on SmolLM2, all positions scored);
  an upper bound for the completion head, which scores the completion tokens only;
- a fixed allowance for the process (imported libraries, CUDA context, allocator slack).

Sharded over N ranks (FSDP2) the estimate is per rank: each rank keeps 1/N of every weight and
of the LoRA parameters, their gradients and AdamW's moments, plus the units it gathers whole
while computing them (:data:`GATHERED_LAYERS` decoder layers, the one running and the one
prefetched, and the output head, which accelerate keeps gathered from the end of the forward
to the start of the backward); the activations are each rank's own batch, as without sharding.
With ``fsdp_offload_params`` (``offload``) the shards live in host memory and only the gathered
units occupy the device.

tests/training/test_resources.py checks the estimate against a measured peak (tiny model).

Run as ``python -m lorad.training.resources [--model DIR] ...`` it prints the environment as
JSON; ``lorad doctor`` calls it that way so the CLI never imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass

LR_MIN, LR_MAX = 1e-7, 1e-2

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "4bit": 0.5625}
# Values per token, layer and hidden unit kept for backward, with and without LoRA dropout.
ACTIVATION_FACTOR = {True: 34, False: 24}
CHECKPOINTED_FACTOR = 2
HEAD_TILES = 10
HEAD_TOKEN_CHUNK, HEAD_VOCAB_CHUNK = 4096, 32768  # the chunked LM head's tile (trl's constants)
# The process itself: Python with torch, transformers, trl and peft imported is ~460 MB resident
# before a model loads (measured on CPU); a CUDA context takes 300-500 MB; plus allocator slack.
FRAMEWORK_BYTES = 768 * 2**20
# FSDP2 gathers a decoder layer whole to compute it, and prefetches the next one meanwhile.
GATHERED_LAYERS = 2


class ResourceError(Exception):
    "The run cannot start on this device as configured; the message says what to change."


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool
    count: int = 1


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden_size: int
    layers: int
    vocab_size: int
    lora_parameters: int
    tied_embeddings: bool = True  # the output head shares the input embedding's weights

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (all but the embedding and the output head, evenly)."""
        outside = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return max(self.parameters - outside, 0) // max(self.layers, 1)


@dataclass(frozen=True)
class Estimate:
    """Bytes one process needs; with ``shards`` > 1 (FSDP2) one rank's share, ``weights``
    including the ``gathered`` units it holds whole while computing them."""

    weights: int
    lora: int
    activations: int
    framework: int
    dtype: str
    shards: int = 1
    gathered: int = 0
    offload: bool = False  # the shards are in host memory; the device holds the gathered units

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.framework

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def check_learning_rate(lr: float) -> None:
    """Raises ResourceError when ``lr`` lies outside [1e-7, 1e-2] (no silent clamp)."""
    if not (LR_MIN <= lr <= LR_MAX):
        raise ResourceError(
            f"learning_rate {lr!r} is outside the sane range for LoRA training "
            f"[{LR_MIN:g}, {LR_MAX:g}]; set training.learning_rate inside it (e.g. 2e-4)"
        )


def detect_device() -> Device:
    """The first CUDA device when there is one, else the CPU (its available RAM)."""
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return Device(
            "cuda",
            torch.cuda.get_device_name(0),
            total,
            free,
            torch.cuda.is_bf16_supported(),
            torch.cuda.device_count(),
        )
    total, available = _ram()
    return Device("cpu", _cpu_name(), total, available, False, 1)


def _ram() -> tuple[int, int]:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"], info.get("MemAvailable", info["MemFree"])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def model_shape(model_dir: str, lora_r: int, target_modules, *, local_files_only: bool = True) -> ModelShape:
    """Parameter counts from the model's config alone (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if str(model_dir).endswith(".gguf"):  # not converted yet: the GGUF header has the config
        config = AutoConfig.from_pretrained(
            os.path.dirname(os.path.abspath(model_dir)), gguf_file=os.path.basename(model_dir)
        )
    else:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=local_files_only)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    lora = 0
    targets = set(target_modules)
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if "all-linear" in targets or name.rsplit(".", 1)[-1] in targets:
            lora += lora_r * (module.in_features + module.out_features)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    inputs = model.get_input_embeddings()
    tied = output is None or inputs is None or output.weight is inputs.weight
    return ModelShape(parameters, text.hidden_size, text.num_hidden_layers, text.vocab_size, lora, tied)


def estimate(
    shape: ModelShape,
    *,
    batch_size: int,
    seq_length: int,
    dtype: str,
    gradient_checkpointing: bool,
    lora_dropout: bool = True,
    shards: int = 1,
    offload: bool = False,
) -> Estimate:
    """Bytes a LoRA run needs (see the module docstring for the terms), per rank.

    ``lora_dropout``: whether training.lora_dropout is above 0 (peft then keeps a dropped copy
    of each adapted layer's input for the backward pass). ``shards``: the ranks an FSDP2 run
    shards the model over (1: every process holds the whole model, as DDP's do). ``offload``:
    FSDP2 keeps the shards in host memory (fsdp_offload_params), so the device holds only the
    gathered units.
    """
    per_param = BYTES_PER_PARAM[dtype]
    weights = int(shape.parameters * per_param)
    lora = shape.lora_parameters * 4 * 4
    gathered = 0
    if shards > 1:
        gathered = int((GATHERED_LAYERS * shape.layer_parameters + shape.vocab_size * shape.hidden_size) * per_param)
        weights = (0 if offload else -(-weights // shards)) + gathered
        lora = -(-lora // shards)
    act_bytes = 4 if dtype == "float32" else 2
    per_layer = ACTIVATION_FACTOR[bool(lora_dropout)]
    tokens = batch_size * seq_length  # packed or padded, a batch holds at most this many
    if gradient_checkpointing:
        values = shape.layers * CHECKPOINTED_FACTOR + per_layer  # layer inputs + one layer recomputed
    else:
        values = shape.layers * per_layer
    activations = tokens * shape.hidden_size * values * act_bytes
    activations += min(tokens, HEAD_TOKEN_CHUNK) * min(shape.vocab_size, HEAD_VOCAB_CHUNK) * 4 * HEAD_TILES
    return Estimate(weights, lora, activations, FRAMEWORK_BYTES, dtype, shards, gathered, shards > 1 and offload)


def check_fits(
    shape: ModelShape,
    device: Device,
    *,
    batch_size: int,
    seq_length: int,
    dtype: str,
    gradient_checkpointing: bool,
    headroom: float,
    lora_dropout: bool = True,
    shards: int = 1,
    offload: bool = False,
) -> Estimate:
    """The estimate, when it fits in ``headroom`` x the device's free memory (per rank: each
    rank has a device of its own).

    Raises:
        ResourceError: it does not fit; the message gives both figures and the largest
            batch size (then sequence length) that would.
    """
    est = estimate(
        shape,
        batch_size=batch_size,
        seq_length=seq_length,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        lora_dropout=lora_dropout,
        shards=shards,
        offload=offload,
    )
    budget = int(device.free_bytes * headroom)
    if est.total <= budget:
        return est
    hint = suggest(
        shape,
        budget,
        batch_size=batch_size,
        seq_length=seq_length,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        lora_dropout=lora_dropout,
        shards=shards,
        offload=offload,
    )
    hint_text = (
        f"try training.batch_size = {hint[0]} and training.max_seq_length = {hint[1]}"
        if hint
        else "even batch_size 1 with max_seq_length 64 does not fit: use a smaller "
        'base model, quantization = "4bit" on CUDA, or a larger device'
    )
    per_rank = f" per rank of {shards} (FSDP2)" if shards > 1 else ""
    raise ResourceError(
        f"the run needs about {_gib(est.total)}{per_rank} (weights {_gib(est.weights)}, LoRA + optimizer "
        f"{_gib(est.lora)}, activations {_gib(est.activations)} for batch {batch_size} x seq "
        f"{seq_length}) but {device.kind} has {_gib(device.free_bytes)} free "
        f"({headroom:.0%} usable = {_gib(budget)}); {hint_text}"
    )


def suggest(
    shape: ModelShape,
    budget: int,
    *,
    batch_size: int,
    seq_length: int,
    dtype: str,
    gradient_checkpointing: bool,
    lora_dropout: bool = True,
    shards: int = 1,
    offload: bool = False,
) -> tuple[int, int] | None:
    """The largest (batch, seq) that fits ``budget``: halve the batch first, then the sequence."""
    b, s = batch_size, seq_length
    while True:
        est = estimate(
            shape,
            batch_size=b,
            seq_length=s,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            lora_dropout=lora_dropout,
            shards=shards,
            offload=offload,
        )
        if est.total <= budget:
            return b, s
        if b > 1:
            b //= 2
        elif s > 64:
            s //= 2
        else:
            return None


def use_checkpointing(
    shape: ModelShape,
    device: Device,
    *,
    requested: bool,
    batch_size: int,
    seq_length: int,
    dtype: str,
    headroom: float,
    lora_dropout: bool = True,
    shards: int = 1,
    offload: bool = False,
) -> bool:
    """Whether the run checkpoints activations (training.gradient_checkpointing = ``requested``).

    On CUDA as requested. On the CPU only when requested and the run would not fit without it:
    there it cuts the activations (34 values per token, layer and hidden unit) to the layer
    inputs, but recomputing each layer's forward costs a third more time per step
    (bench/memory.py, BENCHMARKS.md), so a run that fits trains without it.
    """
    if device.kind == "cuda" or not requested:
        return requested
    without = estimate(
        shape,
        batch_size=batch_size,
        seq_length=seq_length,
        dtype=dtype,
        gradient_checkpointing=False,
        lora_dropout=lora_dropout,
        shards=shards,
        offload=offload,
    )
    return without.total > int(device.free_bytes * headroom)


def training_dtype(device: Device, quantization: str) -> str:
    """fp32 on the CPU; on CUDA bf16 where supported (fp16 otherwise), 4-bit when asked and possible."""
    if device.kind != "cuda":
        return "float32"
    if quantization in ("4bit", "auto") and bitsandbytes_available():
        return "4bit"
    return "bfloat16" if device.bf16 else "float16"


def bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def environment(
    model_dir: str | None,
    *,
    state_dir: str | None,
    lora_r: int,
    target_modules,
    batch_size: int,
    seq_length: int,
    quantization: str,
    gradient_checkpointing: bool,
    headroom: float,
    lora_dropout: bool = True,
    shards: int = 1,
    offload: bool = False,
) -> dict:
    """A report of the environment for ``lorad doctor`` (and the estimate for a model; per rank
    when ``shards`` > 1, an FSDP2 run's ranks)."""
    import torch

    device = detect_device()
    report: dict = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "device": asdict(device),
        "bitsandbytes": bitsandbytes_available(),
    }
    if device.kind == "cuda":
        report["devices"] = [
            {
                "index": i,
                "name": torch.cuda.get_device_name(i),
                "total_bytes": torch.cuda.get_device_properties(i).total_memory,
            }
            for i in range(torch.cuda.device_count())
        ]
    if state_dir:
        probe = state_dir
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe.rstrip("/")) or "/"
        report["state_dir"] = {"path": state_dir, "disk_free_bytes": shutil.disk_usage(probe).free}
    if model_dir:
        try:
            shape = model_shape(model_dir, lora_r, target_modules)
            dtype = training_dtype(device, quantization)
            checkpointing = use_checkpointing(
                shape,
                device,
                requested=gradient_checkpointing,
                batch_size=batch_size,
                seq_length=seq_length,
                dtype=dtype,
                headroom=headroom,
                lora_dropout=lora_dropout,
                shards=shards,
                offload=offload,
            )
            est = estimate(
                shape,
                batch_size=batch_size,
                seq_length=seq_length,
                dtype=dtype,
                gradient_checkpointing=checkpointing,
                lora_dropout=lora_dropout,
                shards=shards,
                offload=offload,
            )
            budget = int(device.free_bytes * headroom)
            report["estimate"] = est.as_dict() | {
                "model": model_dir,
                "parameters": shape.parameters,
                "lora_parameters": shape.lora_parameters,
                "batch_size": batch_size,
                "seq_length": seq_length,
                "gradient_checkpointing": checkpointing,
                "budget_bytes": budget,
                "fits": est.total <= budget,
            }
            if est.total > budget:
                report["estimate"]["suggestion"] = suggest(
                    shape,
                    budget,
                    batch_size=batch_size,
                    seq_length=seq_length,
                    dtype=dtype,
                    gradient_checkpointing=checkpointing,
                    lora_dropout=lora_dropout,
                    shards=shards,
                    offload=offload,
                )
        except Exception as e:  # the doctor reports; it does not stop at the first problem
            report["estimate"] = {"model": model_dir, "error": f"{type(e).__name__}: {e}"}
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lorad.config import TrainingSettings

    d = TrainingSettings()  # the defaults of the [training] keys these flags stand for
    p = argparse.ArgumentParser(prog="python -m lorad.training.resources")
    p.add_argument("--model", help="base model: HF id, local directory or .gguf file")
    p.add_argument("--state-dir")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--target-modules", nargs="*", default=list(d.target_modules))
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-length", type=int, default=d.max_seq_length)
    p.add_argument("--quantization", default=d.quantization)
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--headroom", type=float, default=d.memory_headroom)
    p.add_argument("--shards", type=int, default=1, help="ranks an FSDP2 run shards the model over")
    p.add_argument("--offload", action="store_true", help="FSDP2 keeps the shards in host memory")
    args = p.parse_args(argv)
    model_dir = None
    if args.model:
        from lorad.training.base_model import BaseModelError, resolve

        try:
            model_dir = str(resolve(args.model, args.state_dir or "", convert=False))
        except BaseModelError as e:
            model_dir = None
            model_error = str(e)
    report = environment(
        model_dir,
        state_dir=args.state_dir,
        lora_r=args.lora_r,
        target_modules=args.target_modules,
        batch_size=args.batch_size,
        seq_length=args.seq_length,
        quantization=args.quantization,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        headroom=args.headroom,
        lora_dropout=args.lora_dropout > 0,
        shards=args.shards,
        offload=args.offload,
    )
    if args.model and model_dir is None:
        report["estimate"] = {"model": args.model, "error": model_error}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
