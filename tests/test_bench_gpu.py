"""bench/gpu.py in its tiny mode on the CPU, so the GPU benchmark never rots between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_end_to_end_in_tiny_mode_and_prints_its_table():
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny"], capture_output=True, text=True, env=env, timeout=900
    )
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    table = [line for line in out.splitlines() if line.startswith("| tiny")]
    runs = [line.split("|")[2].strip() for line in table]
    assert runs == [
        "plain trl (same settings)",
        "lorad (defaults)",
        "plain trl, no checkpointing",
        "lorad, packing off",
    ]
    assert "packing=True" in table[1] and "completion_head=True" in table[1]
    assert "packing=False" in table[3]
    for line in table:
        assert float(line.split("|")[3].replace(",", "")) > 0  # tokens/s
    # The CUDA-only rows are skipped with their reason, never silently.
    assert "skipped: tiny liger on/off: needs CUDA" in out
    assert "skipped: tiny 4-bit QLoRA: needs CUDA" in out
    # The FLOPs formula's inputs: rows of tens of tokens attend to tens of earlier ones.
    context = float(out.split("mean attended context ")[1].split()[0])
    assert 10 < context < 128
    assert "health check: ok" in out and "loads with PeftModel.from_pretrained: finite logits" in out
