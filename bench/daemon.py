"""The daemon under load: status round-trips idle and while a job trains, memory, artifact latency.

Starts `lorad serve` as a subprocess on a temporary copy of the fixture store (tiny model for
the training job), then measures:

- status round-trip p50/p99 while idle, and while a tiny-model job trains (ratio to idle);
- the daemon's resident memory while idle (target < 100 MB), against a bare Python
  interpreter measured in the same run, and whether torch is in the daemon's sys.modules;
- artifact-to-buffer latency p50/p99: an artifact file renamed into the store until its row
  is visible in SQLite (target p99 < 1 s), against the in-process ingest of that one file;
- resident memory through a burst of --burst (20,000) artifact files written as fast as one
  process can: the peak (the examples refresh of the new chains), and 30 s after the burst is
  in the buffer (settled: refreshed, and the memory given back; target < 150 MB).

    .venv/bin/python bench/daemon.py [--requests 500] [--artifacts 50] [--burst 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "daemon"))

from daemon_helpers import WORKER_ENV, Daemon, config_text, training_sections, write_artifact  # noqa: E402

from lorad.daemon import protocol  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def status_latencies(d: Daemon, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = protocol.request(d.socket, "status", timeout=10)
        out.append((time.perf_counter() - t0) * 1000)
        assert r["ok"]
    return out


def bare_python_rss() -> int:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.5)
        return psutil.Process(p.pid).memory_info().rss
    finally:
        p.kill()
        p.wait()


def artifact_latencies(d: Daemon, store: Path, db: Path, n: int) -> list[float]:
    out = []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            aid = write_artifact(store)
            while not conn.execute("SELECT 1 FROM artifacts WHERE artifact_id = ?", (aid,)).fetchone():
                time.sleep(0.002)
                if time.perf_counter() - t0 > 10:
                    raise RuntimeError(f"artifact {aid} not ingested within 10 s")
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
    finally:
        conn.close()
    return out


def direct_ingest_ms(store: Path, scratch: Path, n: int = 20) -> float:
    """The work itself: ingest one new file in-process, no watcher, no debounce."""
    import structlog

    from lorad.buffer.store import Buffer
    from lorad.sources import AtomicGuardSource
    from lorad.sources.ingest import ingest

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    times = []
    with Buffer(scratch / "direct.sqlite3") as buffer:
        reader = AtomicGuardSource("bench", store)
        ingest(buffer, [reader])
        for _ in range(n):
            aid = write_artifact(store)
            path = next((store / "objects" / aid[:2]).glob(f"{aid}.json"))
            t0 = time.perf_counter()
            ingest(buffer, [reader], paths=[str(path)])
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def burst_rss(d: Daemon, store: Path, db: Path, n: int, settle: float = 30.0) -> dict:
    """Write ``n`` artifact files at once; the daemon's RSS at its peak and once it settled."""
    proc = psutil.Process(d.proc.pid)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        before = conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]
        peak = proc.memory_info().rss
        t0 = time.perf_counter()
        for i in range(n):
            write_artifact(store)
            if i % 250 == 0:
                peak = max(peak, proc.memory_info().rss)
        written = time.perf_counter() - t0
        while conn.execute("SELECT count(*) FROM artifacts").fetchone()[0] < before + n:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.1)
            if time.perf_counter() - t0 > 900:
                raise RuntimeError("the burst was not ingested within 900 s")
        ingested = time.perf_counter() - t0
        # The examples refresh of the burst's chains (10-15 s here), then the memory release.
        deadline = time.perf_counter() + settle
        while time.perf_counter() < deadline:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.1)
        settled = proc.memory_info().rss
    finally:
        conn.close()
    return {
        "burst_files": n,
        "burst_written_s": written,
        "burst_ingested_s": ingested,
        "burst_peak_rss_mb": peak / 2**20,
        "burst_settled_rss_mb": settled / 2**20,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--artifacts", type=int, default=50)
    ap.add_argument("--burst", type=int, default=20_000, help="files in the memory burst (0: none)")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="lorad-bench-", dir="/tmp"))
    try:
        store = root / "store"
        shutil.copytree(ROOT / "tests" / "fixtures" / "atomicguard-store", store)
        import torch

        from lorad.training.tiny import build_tiny_model

        torch.set_num_threads(1)
        model = build_tiny_model(root / "model")
        sections = training_sections(model, max_steps=100000, save_steps=100000)
        # inotify drops events when a burst outruns its queue (16,384); the reconciliation scan
        # then finds the rest: sooner than the default 300 s, to keep the run short.
        sections["schedule"]["reconcile_interval"] = 30
        d = Daemon(root, config_text(root, store, **sections), env=WORKER_ENV).start()
        try:
            idle = status_latencies(d, args.requests)
            time.sleep(1.0)
            proc = psutil.Process(d.proc.pid)
            rss = proc.memory_info().rss
            torch_loaded = protocol.request(d.socket, "status")["torch_loaded"]
            baseline_rss = bare_python_rss()

            latencies = artifact_latencies(d, store, root / "state" / "buffer.sqlite3", args.artifacts)
            direct = direct_ingest_ms(store, root)
            burst = burst_rss(d, store, root / "state" / "buffer.sqlite3", args.burst) if args.burst else {}

            job_id = protocol.request(d.socket, "train_now")["job"]["job_id"]
            deadline = time.monotonic() + 120
            while True:
                job = protocol.request(d.socket, "job", job_id=job_id)["job"]
                if job["state"] == "training" and ((job.get("progress") or {}).get("step") or 0) >= 1:
                    break
                if time.monotonic() > deadline or job["state"] in ("failed", "cancelled"):
                    raise RuntimeError(f"the job did not start training: {job}")
                time.sleep(0.2)
            training = status_latencies(d, args.requests)
            step = protocol.request(d.socket, "status")["job"]["progress"]["step"]
            protocol.request(d.socket, "cancel", job_id=job_id)
        finally:
            d.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    figures = {
        "status_idle_p50_ms": percentile(idle, 50),
        "status_idle_p99_ms": percentile(idle, 99),
        "status_training_p50_ms": percentile(training, 50),
        "status_training_p99_ms": percentile(training, 99),
        "daemon_rss_mb": rss / 2**20,
        "bare_python_rss_mb": baseline_rss / 2**20,
        "torch_loaded": torch_loaded,
        "artifact_p50_ms": percentile(latencies, 50),
        "artifact_p99_ms": percentile(latencies, 99),
        "direct_ingest_ms": direct,
        "job_step_during_measurement": step,
        **burst,
    }
    figures["status_training_ratio_p99"] = figures["status_training_p99_ms"] / figures["status_idle_p99_ms"]
    print(f"daemon benchmark ({args.requests} status requests per phase, {args.artifacts} artifacts)")
    print(
        f"  status round-trip idle:          p50 {figures['status_idle_p50_ms']:6.2f} ms  "
        f"p99 {figures['status_idle_p99_ms']:6.2f} ms"
    )
    print(
        f"  status round-trip while training: p50 {figures['status_training_p50_ms']:6.2f} ms  "
        f"p99 {figures['status_training_p99_ms']:6.2f} ms  "
        f"(p99 ratio to idle {figures['status_training_ratio_p99']:.2f}; "
        f"job at step {step})"
    )
    print(
        f"  daemon RSS idle: {figures['daemon_rss_mb']:.1f} MB (target < 100 MB; bare python "
        f"{figures['bare_python_rss_mb']:.1f} MB, "
        f"ratio {figures['daemon_rss_mb'] / figures['bare_python_rss_mb']:.1f}); "
        f"torch imported in the daemon: {torch_loaded}"
    )
    print(
        f"  artifact -> buffer latency: p50 {figures['artifact_p50_ms']:.0f} ms  "
        f"p99 {figures['artifact_p99_ms']:.0f} ms "
        f"(target p99 < 1000 ms; in-process ingest of one file {direct:.1f} ms, "
        f"p50 ratio {figures['artifact_p50_ms'] / direct:.1f})"
    )
    if burst:
        print(
            f"  daemon RSS through a burst of {burst['burst_files']:,} files (written in "
            f"{burst['burst_written_s']:.1f} s, all in the buffer {burst['burst_ingested_s']:.1f} s after the first): "
            f"peak {burst['burst_peak_rss_mb']:.1f} MB, settled {burst['burst_settled_rss_mb']:.1f} MB "
            f"(target settled < 150 MB; idle before {figures['daemon_rss_mb']:.1f} MB)"
        )
    return figures


if __name__ == "__main__":
    figures = main()
    if os.environ.get("BENCH_JSON"):
        json.dump(figures, sys.stdout)
