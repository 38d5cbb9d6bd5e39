"""Run every benchmark under bench/ and write BENCHMARKS.md.

Each script runs as its own process (a fresh interpreter, as a user would run it) and prints
its figures together with a baseline it measured in the same run; this script collects them
into one table — figure, baseline, ratio, target, whether the target is met — with the
machine it ran on and the command that reproduces each row.

    .venv/bin/python bench/run_all.py [--quick] [--only ingest,daemon] [--output BENCHMARKS.md]

``make bench`` runs it with the defaults. ``--quick`` shrinks every workload (for a smoke run;
its figures are not the published ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = ".venv/bin/python"


@dataclass
class Row:
    """One figure with the baseline it is compared against, from the same run."""

    figure: str
    value: str
    baseline: str
    ratio: str
    target: str
    met: bool | None  # None: no target for this figure


class Missing(Exception):
    "A benchmark's output did not contain a figure it should print."


def grab(pattern: str, text: str, *groups: int) -> tuple[float, ...]:
    m = re.search(pattern, text, re.M)
    if not m:
        raise Missing(f"no match for {pattern!r}")
    return tuple(float(m.group(g).replace(",", "")) for g in (groups or (1,)))


NUM = r"([\d,]+(?:\.\d+)?)"


# -- one parser per script: its stdout -> rows ---------------------------------------------------


def parse_ingest(out: str) -> list[Row]:
    (ceiling,) = grab(rf"ceiling .*?:\s+{NUM} artifacts/s", out)
    (rate,) = grab(rf"lorad ingest .*?:\s+{NUM} artifacts/s", out)
    (rescan,) = grab(rf"rescan of the unchanged store:\s+{NUM} artifacts/s", out)
    (written,) = grab(rf"the database alone .*?: {NUM} artifacts/s", out)
    (normal,) = grab(rf"with synchronous=normal .*?: {NUM} artifacts/s", out)
    (n,) = grab(rf"ingest benchmark: {NUM} AtomicGuard", out)
    ratio = rate / ceiling
    return [
        Row(
            f"ingest throughput, first scan of {n:,.0f} artifact files (synchronous=full)",
            f"{rate:,.0f} artifacts/s",
            f"parse ceiling (read + json.loads, no DB): {ceiling:,.0f} artifacts/s",
            f"{ratio:.2f}",
            ">= 0.50 of the ceiling",
            ratio >= 0.5,
        ),
        Row(
            "the same first scan with synchronous=normal (its end not synced either)",
            f"{normal:,.0f} artifacts/s",
            f"parse ceiling: {ceiling:,.0f} artifacts/s",
            f"{normal / ceiling:.2f}",
            "",
            None,
        ),
        Row(
            "rescan of the unchanged store",
            f"{rescan:,.0f} artifacts/s",
            f"parse ceiling: {ceiling:,.0f} artifacts/s",
            f"{rescan / ceiling:.1f}",
            "",
            None,
        ),
        Row(
            "the database alone: the same batches parsed beforehand, only written (the bound on ingest)",
            f"{written:,.0f} artifacts/s",
            f"parse ceiling: {ceiling:,.0f} artifacts/s",
            f"{written / ceiling:.2f}",
            "",
            None,
        ),
    ]


def parse_sampling(out: str) -> list[Row]:
    mix, total, base = grab(
        rf"replay mix of 2,000 from {NUM} examples: {NUM} ms.*ORDER BY RANDOM\(\): {NUM} ms", out, 2, 1, 3
    )
    (snap,) = grab(rf"build_snapshot, 2,000 SFT rows .*?: {NUM} ms", out)
    lines, exp_s, floor_s = grab(rf"export of {NUM} chat examples: {NUM} s .*floor .*?: {NUM} s", out, 1, 2, 3)
    n_refresh, refresh_s, per_us = grab(
        rf"refresh: {NUM} chains -> examples in {NUM} s \({NUM} us per example", out, 1, 2, 3
    )
    return [
        Row(
            f"replay mix: 2,000 examples drawn from {total:,.0f}",
            f"{mix:.1f} ms",
            f"ORDER BY RANDOM() over the same pool: {base:.1f} ms",
            f"{base / mix:.1f}x faster",
            "< 100 ms",
            mix < 100,
        ),
        Row(
            f"build_snapshot of 2,000 SFT rows from {total:,.0f} (draw + load + format)",
            f"{snap:.0f} ms",
            f"replay draw alone: {mix:.1f} ms",
            f"{snap / mix:.1f}x the draw",
            "",
            None,
        ),
        Row(
            f"export of {lines:,.0f} chat examples to JSONL",
            f"{exp_s:.1f} s ({lines / exp_s:,.0f}/s)",
            f"floor (read rows + json.dumps, no formatting): {floor_s:.1f} s",
            f"{exp_s / floor_s:.1f}x the floor",
            "",
            None,
        ),
        Row(
            f"examples refresh (MinHash, LSH, split, dedup) of {n_refresh:,.0f} chains",
            f"{per_us:.0f} us/example",
            "",
            "",
            "",
            None,
        ),
    ]


def parse_train(out: str) -> list[Row]:
    rows, labels = [], []
    pattern = rf"^(.+?): baseline trl script {NUM} tokens/s .*?lorad worker {NUM} tokens/s .*?; ratio {NUM}"
    for m in re.finditer(pattern, out, re.M):
        label, base, mine, ratio = m.group(1), *(float(m.group(i).replace(",", "")) for i in (2, 3, 4))
        labels.append(label)
        rows.append(
            Row(
                f"training tokens/s, {label}, lorad worker (CPU)",
                f"{mine:,.0f} tokens/s",
                f"plain trl SFTTrainer script: {base:,.0f} tokens/s",
                f"{ratio:.3f}",
                ">= 0.95",
                ratio >= 0.95,
            )
        )
    for m, label in zip(  # a packing line for each model measured above, in its order
        re.finditer(
            rf"lorad defaults \(packing, completion-only LM head\): {NUM} tokens/s vs the "
            rf"padded default before them {NUM}: x{NUM}",
            out,
        ),
        labels,
        strict=False,
    ):
        new, padded, speedup = (float(m.group(i).replace(",", "")) for i in (1, 2, 3))
        smollm2 = "SmolLM2" in label
        rows.append(
            Row(
                f"lorad defaults (packing, completion-only LM head) on mixed-length rows, {label}",
                f"{new:,.0f} tokens/s",
                f"padded batches, the default before: {padded:,.0f} tokens/s",
                f"{speedup:.2f}",
                ">= 1.3" if smollm2 else "",
                speedup >= 1.3 if smollm2 else None,
            )
        )
    if not rows:
        raise Missing("no training comparison in the output")
    return rows


BURST_RSS_TARGET_MB = 150  # the README's bound for the daemon after a 20,000-file burst


def parse_daemon(out: str) -> list[Row]:
    f = json.loads(out.strip().splitlines()[-1])
    idle50, idle99 = f["status_idle_p50_ms"], f["status_idle_p99_ms"]
    tr50, tr99 = f["status_training_p50_ms"], f["status_training_p99_ms"]
    return [
        Row("`lorad status` round-trip, idle daemon", f"p50 {idle50:.2f} ms, p99 {idle99:.2f} ms", "", "", "", None),
        Row(
            "`lorad status` round-trip while a job trains",
            f"p50 {tr50:.2f} ms, p99 {tr99:.2f} ms",
            f"idle: p99 {idle99:.2f} ms",
            f"{tr99 / idle99:.2f} (p99)",
            "p99 < 50 ms",
            tr99 < 50,
        ),
        Row(
            "daemon resident memory, idle",
            f"{f['daemon_rss_mb']:.1f} MB",
            f"bare python interpreter: {f['bare_python_rss_mb']:.1f} MB",
            f"{f['daemon_rss_mb'] / f['bare_python_rss_mb']:.1f}",
            "< 100 MB, torch not imported",
            f["daemon_rss_mb"] < 100 and not f["torch_loaded"],
        ),
        Row(
            "artifact-to-buffer latency (file renamed into the store -> row in SQLite)",
            f"p50 {f['artifact_p50_ms']:.0f} ms, p99 {f['artifact_p99_ms']:.0f} ms",
            f"in-process ingest of one file: {f['direct_ingest_ms']:.1f} ms",
            f"{f['artifact_p50_ms'] / f['direct_ingest_ms']:.1f} (p50)",
            "p99 < 1000 ms",
            f["artifact_p99_ms"] < 1000,
        ),
    ] + (
        [
            Row(
                f"daemon resident memory after a burst of {f['burst_files']:,} artifact files "
                "(settled; peak during it)",
                f"{f['burst_settled_rss_mb']:.1f} MB (peak {f['burst_peak_rss_mb']:.1f} MB)",
                f"idle before: {f['daemon_rss_mb']:.1f} MB",
                f"{f['burst_settled_rss_mb'] / f['daemon_rss_mb']:.1f}",
                f"settled < {BURST_RSS_TARGET_MB} MB",
                f["burst_settled_rss_mb"] < BURST_RSS_TARGET_MB,
            ),
        ]
        if "burst_files" in f
        else []
    )


def parse_evaluation(out: str) -> list[Row]:
    model, n = re.search(r"^model: (.+?); (\d+) prompts", out, re.M).groups()
    single, batched = grab(rf"generation\s+one at a time\s+{NUM} s\s+batched\s+{NUM} s", out, 1, 2)
    same = re.search(r"identical answers (\d+/\d+)", out).group(1)
    l1, lb = grab(rf"loss\s+one at a time\s+{NUM} s\s+batched\s+{NUM} s", out, 1, 2)
    g1, gp = grab(rf"guards\s+one at a time\s+{NUM} s\s+parallel\s+{NUM} s", out, 1, 2)
    return [
        Row(
            f"held-out generation, {n} prompts, batched ({model})",
            f"{batched:.2f} s",
            f"one prompt at a time: {single:.2f} s",
            f"{single / batched:.2f}x faster",
            f"same greedy answers ({same})",
            same.split("/")[0] == same.split("/")[1],
        ),
        Row(
            f"held-out loss, {n} examples, batched",
            f"{lb:.2f} s",
            f"one at a time: {l1:.2f} s",
            f"{l1 / lb:.2f}x faster",
            "",
            None,
        ),
        Row(
            f"guards on {n} answers, parallel",
            f"{gp:.2f} s",
            f"one after another: {g1:.2f} s",
            f"{g1 / gp:.2f}x faster",
            "",
            None,
        ),
    ]


@dataclass
class Bench:
    name: str
    argv: list[str]
    quick: list[str]
    parse: object
    env: dict | None = None


BENCHES = [
    Bench("ingest", ["bench/ingest.py"], ["--artifacts", "2000", "--repeat", "1"], parse_ingest),
    Bench(
        "sampling",
        ["bench/sampling.py"],
        ["--examples", "50000", "--export", "5000", "--refresh", "2000"],
        parse_sampling,
    ),
    Bench("train", ["bench/train.py"], ["--steps", "4", "--repeats", "1", "--no-smollm2"], parse_train),
    Bench(
        "daemon",
        ["bench/daemon.py"],
        ["--requests", "100", "--artifacts", "10", "--burst", "2000"],
        parse_daemon,
        {"BENCH_JSON": "1"},
    ),
    Bench("evaluation", ["bench/evaluation.py"], ["--samples", "8", "--new-tokens", "8"], parse_evaluation),
]


def machine() -> dict:
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, transformers, trl, peft; print(torch.__version__,"
            " transformers.__version__, trl.__version__, peft.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    torch_v, tf_v, trl_v, peft_v = (versions + ["?"] * 4)[:4]
    return {
        "cpu": cpu or "unknown",
        "cores": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch_v,
        "transformers": tf_v,
        "trl": trl_v,
        "peft": peft_v,
        "load_at_start": os.getloadavg()[0],
    }


def run(bench: Bench, quick: bool) -> dict:
    argv = [sys.executable, *bench.argv, *(bench.quick if quick else [])]
    shown = " ".join([PY, *bench.argv, *(bench.quick if quick else [])])
    print(f"== {bench.name}: {shown}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(bench.env or {}))
    t = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - t
    sys.stdout.write(proc.stdout if not bench.env else "\n".join(proc.stdout.splitlines()[:-1]) + "\n")
    entry = {
        "name": bench.name,
        "command": ("BENCH_JSON=1 " if bench.env else "") + shown,
        "seconds": seconds,
        "rows": [],
        "error": None,
        "output": proc.stdout,
    }
    if proc.returncode != 0:
        entry["error"] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"
        sys.stderr.write(proc.stderr[-3000:])
        return entry
    try:
        entry["rows"] = bench.parse(proc.stdout)
    except (Missing, AttributeError, ValueError, KeyError) as e:
        entry["error"] = f"could not read its figures: {e}"
    return entry


# Sections measured by hand (minutes to hours of SmolLM2 steps each, not part of `make bench`): a
# regenerated file keeps them as they are.
HAND_SECTIONS = ("Learning", "Closed loop", "Memory")


def kept_sections(path: Path) -> str:
    """The hand-measured sections of the existing file, in HAND_SECTIONS order; "" when none."""
    text = path.read_text() if path.exists() else ""
    kept = []
    for title in HAND_SECTIONS:
        start = text.find(f"\n## {title}\n")
        if start < 0:
            continue
        end = text.find("\n## ", start + 1)
        kept.append(text[start + 1 : end + 1] if end > 0 else text[start + 1 :] + "\n")
    return "".join(kept)


def render(results: list[dict], info: dict, quick: bool, started: datetime) -> str:
    out = [
        "# lorad benchmarks",
        "",
        f"Generated by `make bench` (`{PY} bench/run_all.py{' --quick' if quick else ''}`) on "
        f"{started:%Y-%m-%d %H:%M} UTC. Every ratio compares lorad with a baseline measured in the same "
        "process run, on the same machine, at the same time; tests check behaviour, these check cost.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cores']} cores; memory {info['memory_gib']:.1f} GiB; no GPU used",
        f"- {info['os']}; Python {info['python']}; torch {info['torch']}, transformers {info['transformers']}, "
        f"trl {info['trl']}, peft {info['peft']}",
        f"- load average when the run started: {info['load_at_start']:.1f} (the machine is shared: other work "
        "running at the same time slows both sides of each comparison)",
        "",
    ]
    if quick:
        out += ["**Quick run: shrunken workloads, not the published figures.**", ""]
    out += [
        "## Figures",
        "",
        "| figure | lorad | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            met = "" if row.met is None else ("yes" if row.met else "**no**")
            out.append(f"| {row.figure} | {row.value} | {row.baseline} | {row.ratio} | {row.target} | {met} |")
        if r["error"]:
            out.append(f"| {r['name']}: **did not run** | {r['error']} | | | | |")
    out += ["", "## Reproduce", "", "Each row above comes from one script; run it alone with:", ""]
    for r in results:
        out.append(f"- {r['name']} ({r['seconds']:.0f} s here): `{r['command']}`")
    missed = [row for r in results for row in r["rows"] if row.met is False]
    out += ["", "## Targets missed", ""]
    out += [f"- {row.figure}: {row.value} (target {row.target})" for row in missed] or ["None among the rows above."]
    out += [
        "",
        "The hand-measured sections (" + ", ".join(HAND_SECTIONS) + ") state their own targets "
        "and whether they were met.",
    ]
    out += ["", "## Raw output", ""]
    for r in results:
        out += [
            f"### {r['name']}",
            "",
            "```",
            r["output"].rstrip()
            if not r["command"].startswith("BENCH_JSON")
            else "\n".join(r["output"].rstrip().splitlines()[:-1]),
            "```",
            "",
        ]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shrunken workloads (smoke run)")
    ap.add_argument("--only", default="", help="comma-separated names: " + ",".join(b.name for b in BENCHES))
    ap.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    started = datetime.now(timezone.utc)
    info = machine()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    results = [run(b, args.quick) for b in chosen]
    text = render(results, info, args.quick, started)
    Path(args.output).write_text(
        text.replace("\n## Reproduce", kept_sections(Path(args.output)) + "## Reproduce", 1) + "\n"
    )
    print(f"wrote {args.output}")
    failed = [r["name"] for r in results if r["error"]]
    if failed:
        print(f"benchmarks that did not run or could not be read: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
