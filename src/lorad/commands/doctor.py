"""`lorad doctor`: the training environment and whether the configured run fits.

The CLI never imports torch, so the probe runs as ``python -m lorad.training.resources`` in a
subprocess and reports JSON, which this command prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

from lorad.commands import emit

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser(
        "doctor",
        parents=[common],
        help="print the training environment (CUDA, memory, bitsandbytes, disk) and "
        "the memory estimate for the configured model",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the probe")
    p.set_defaults(func=run)


def probe_command(training, state_dir) -> list[str]:
    t = training
    argv = [
        sys.executable,
        "-m",
        "lorad.training.resources",
        "--model",
        t.base_model,
        "--state-dir",
        str(state_dir),
        "--lora-r",
        str(t.lora_r),
        "--lora-dropout",
        str(t.lora_dropout),
        "--batch-size",
        str(t.batch_size),
        "--seq-length",
        str(t.max_seq_length),
        "--quantization",
        t.quantization,
        "--headroom",
        str(t.memory_headroom),
        "--target-modules",
        *t.target_modules,
    ]
    if not t.gradient_checkpointing:
        argv.append("--no-gradient-checkpointing")
    if t.shards > 1:  # FSDP2: the estimate is each rank's
        argv += ["--shards", str(t.shards)]
        if t.launch is not None and t.launch.offload_params:
            argv.append("--offload")
    return argv


def run(args, settings: Settings) -> int:
    from lorad.commands import CommandError

    try:
        proc = subprocess.run(
            probe_command(settings.training, settings.state_dir), capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        raise CommandError(f"the environment probe did not finish within {args.timeout:g} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CommandError(
            "the environment probe failed (is the training stack installed?):\n" + proc.stderr.strip()[-2000:]
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    emit(args, report, render(report))
    est = report.get("estimate") or {}
    return 0 if est.get("fits", False) else 1


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(r: dict) -> str:
    d = r["device"]
    lines = [
        f"python {r['python']}, torch {r['torch']}",
        f"CUDA: {'yes, ' + str(r['cuda_version']) if r['cuda_available'] else 'no'}",
        f"device: {d['kind']} {d['name']}: {_gib(d['free_bytes'])} free of {_gib(d['total_bytes'])}"
        + (", bf16" if d["bf16"] else ""),
    ]
    for dev in r.get("devices", []):
        lines.append(f"  cuda:{dev['index']} {dev['name']} {_gib(dev['total_bytes'])}")
    lines.append(f"bitsandbytes: {'installed' if r['bitsandbytes'] else 'not installed (no 4-bit QLoRA)'}")
    if "state_dir" in r:
        lines.append(f"state_dir {r['state_dir']['path']}: {_gib(r['state_dir']['disk_free_bytes'])} disk free")
    est = r.get("estimate")
    if est and "error" in est:
        lines.append(f"model {est['model']}: {est['error']}")
    elif est:
        lines.append(
            f"model {est['model']}: {est['parameters']:,} parameters, "
            f"{est['lora_parameters']:,} LoRA parameters ({est['dtype']})"
        )
        shards = est.get("shards", 1)
        where = "the weight shards in host memory" if est.get("offload") else f"1/{shards} of the weights"
        sharded = (
            f" per rank of {shards} (FSDP2: {where} and 1/{shards} of LoRA + optimizer, "
            f"{_gib(est.get('gathered', 0))} of weights gathered at a time, activations of each rank's batch)"
            if shards > 1
            else ""
        )
        lines.append(
            f"estimate for batch {est['batch_size']} x seq {est['seq_length']}{sharded}: {_gib(est['total'])} "
            f"(weights {_gib(est['weights'])}, LoRA + optimizer {_gib(est['lora'])}, activations "
            f"{_gib(est['activations'])}, framework {_gib(est['framework'])}"
            f"{', gradient checkpointing' if est.get('gradient_checkpointing') else ''}) of "
            f"{_gib(est['budget_bytes'])} usable: {'fits' if est['fits'] else 'DOES NOT FIT'}"
        )
        if not est["fits"]:
            hint = est.get("suggestion")
            lines.append(
                f"  suggestion: batch_size = {hint[0]}, max_seq_length = {hint[1]}"
                if hint
                else "  suggestion: use a smaller base model or a larger device"
            )
    return "\n".join(lines)
