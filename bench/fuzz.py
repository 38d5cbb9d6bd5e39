"""The long fuzz run: every reader of untrusted input, at counts far above the test suite's.

Two engines, and the number of inputs each tried, per target:

- atheris (coverage-guided libFuzzer), when it is installed (`pip install atheris`), over the
  artifact parser, the JSONL record parser, the config loader and the control-protocol
  decoder, each in its own process, seeded with valid inputs;
- hypothesis, always: the property tests under tests/fuzz/ (the same four readers plus a
  running daemon's socket) with LORAD_FUZZ_EXAMPLES examples each.

A target fails when an input raises anything but the reader's own rejection (ParseError,
ConfigError, ProtocolError) or a rejection has no reason. Crashing inputs are kept in
--artifacts-dir (crash-<sha1> files) to reproduce.

    .venv/bin/python bench/fuzz.py [--runs 200000] [--examples 5000] [--targets artifact,jsonl,config,protocol]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("artifact", "jsonl", "config", "protocol")


def seeds(target: str) -> list[bytes]:
    from lorad.demo import synthetic

    if target == "artifact":
        files = sorted((ROOT / "tests" / "fixtures" / "atomicguard-store" / "objects").rglob("*.json"))[:8]
        return [p.read_bytes() for p in files] + [
            json.dumps(
                synthetic.artifact(
                    workflow_id="w",
                    content="def f(): pass",
                    status="rejected",
                    feedback="no",
                    feedback_history=[("a0", "SyntaxError")],
                )
            ).encode()
        ]
    if target == "jsonl":
        return [
            json.dumps(
                {"id": "r1", "prompt": "Write f.", "completion": "def f(): pass", "status": "accepted"}
            ).encode(),
            json.dumps(
                {
                    "id": "r2",
                    "parent_id": "r1",
                    "messages": [{"role": "user", "content": "x"}],
                    "score": 0.2,
                    "created_at": "2026-01-01T00:00:00Z",
                }
            ).encode(),
        ]
    if target == "config":
        return [(ROOT / "config.toml").read_bytes(), b'[daemon]\nstate_dir = "/tmp/x"\n[training]\nlora_r = 8\n']
    return [
        b'{"command": "status"}',
        b'{"command": "jobs", "limit": 5}',
        b'{"command": "feedback", "record": {"id": "a", "prompt": "p", "completion": "c", "status": "accepted"}}',
    ]


def one_input(target: str):
    """The function atheris calls with each input: returns normally for a row or a reasoned
    rejection, raises for anything else."""
    from lorad import config
    from lorad.daemon import protocol
    from lorad.sources.atomicguard import parse_artifact
    from lorad.sources.base import ParseError
    from lorad.sources.jsonl import parse_record

    def reasoned(e: Exception) -> None:
        if not str(e).strip():
            raise AssertionError(f"{type(e).__name__} without a reason")

    def artifact(data: bytes) -> None:
        try:
            row = parse_artifact(data, source="s", locator="l")
        except ParseError as e:
            return reasoned(e)
        json.dumps(row)

    def jsonl(data: bytes) -> None:
        try:
            row = parse_record(data, source="s")
        except ParseError as e:
            return reasoned(e)
        json.dumps(row)

    def conf(data: bytes) -> None:
        try:
            config.loads(data.decode("utf-8", "replace"))
        except config.ConfigError as e:
            if not e.problems:
                raise AssertionError("ConfigError without problems") from None

    def proto(data: bytes) -> None:
        try:
            protocol.decode_request(data)
        except protocol.ProtocolError as e:
            return reasoned(e)

    return {"artifact": artifact, "jsonl": jsonl, "config": conf, "protocol": proto}[target]


def run_atheris_target(target: str, runs: int, corpus: Path, artifacts: Path) -> int:
    """In the child process: fuzz one target with libFuzzer until ``runs`` inputs."""
    import atheris

    with atheris.instrument_imports():
        import lorad.config  # noqa: F401
        import lorad.daemon.protocol  # noqa: F401
        import lorad.sources.atomicguard  # noqa: F401
        import lorad.sources.base  # noqa: F401
        import lorad.sources.jsonl  # noqa: F401
    fn = one_input(target)
    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={runs}",
            "-max_len=8192",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
            str(corpus),
        ],
        fn,
    )
    atheris.Fuzz()
    return 0


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def fuzz_with_atheris(targets, runs: int, artifacts: Path) -> list[dict]:
    results = []
    for target in targets:
        corpus = Path(tempfile.mkdtemp(prefix=f"lorad-fuzz-{target}-"))
        for i, seed in enumerate(seeds(target)):
            (corpus / f"seed-{i}").write_bytes(seed)
        t = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                target,
                "--runs",
                str(runs),
                "--artifacts-dir",
                str(artifacts),
                "--corpus",
                str(corpus),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        seconds = time.monotonic() - t
        done = re.findall(r"Done (\d+) runs", proc.stderr)
        execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
        tried = int(done[-1]) if done else int(execs[-1]) if execs else 0
        ok = proc.returncode == 0
        results.append(
            {
                "engine": "atheris",
                "target": target,
                "inputs": tried,
                "seconds": seconds,
                "ok": ok,
                "detail": "" if ok else proc.stderr[-3000:],
            }
        )
        print(
            f"atheris   {target:<9} {tried:>10,} inputs in {seconds:6.1f} s  "
            f"({tried / max(seconds, 1e-9):,.0f}/s)  {'ok' if ok else 'CRASH'}",
            flush=True,
        )
        if not ok:
            print(proc.stderr[-3000:], file=sys.stderr)
    return results


def fuzz_with_hypothesis(examples: int) -> list[dict]:
    """The property tests under tests/fuzz/ at ``examples`` examples each."""
    t = time.monotonic()
    env = dict(os.environ, LORAD_FUZZ_EXAMPLES=str(examples))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    seconds = time.monotonic() - t
    counts: dict[str, int] = {}
    name = None
    for line in proc.stdout.splitlines():
        if m := re.match(r"^(tests/fuzz/\S+::\S+):$", line.strip()):
            name = m.group(1)
        elif name and (m := re.search(r"(\d+) passing, (\d+) failing, and (\d+) invalid", line)):
            counts[name] = counts.get(name, 0) + sum(int(x) for x in m.groups())
    ok = proc.returncode == 0
    failed = set(re.findall(r"^FAILED (tests/fuzz/\S+::[^\s\[]+)", proc.stdout, re.M))
    total = sum(counts.values())
    for name, n in sorted(counts.items()):
        print(f"hypothesis {name.split('::')[1]:<75} {n:>7,} inputs")
    print(
        f"hypothesis total: {total:,} inputs over {len(counts)} property tests in {seconds:.0f} s  "
        f"{'ok' if ok else 'FAILED'}",
        flush=True,
    )
    if not ok:  # the failures with their assertion lines, not the statistics
        print(
            "\n".join(line for line in proc.stdout.splitlines() if line.startswith(("E ", "FAILED", "ERROR"))),
            file=sys.stderr,
        )
    return [
        {"engine": "hypothesis", "target": name, "inputs": n, "seconds": seconds, "ok": name not in failed}
        for name, n in sorted(counts.items())
    ] or [{"engine": "hypothesis", "target": "tests/fuzz", "inputs": 0, "seconds": seconds, "ok": ok}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200_000, help="atheris inputs per target")
    ap.add_argument("--examples", type=int, default=5_000, help="hypothesis examples per property test")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--artifacts-dir", default=str(ROOT / "fuzz-crashes"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_atheris_target(args.child, args.runs, Path(args.corpus), Path(args.artifacts_dir))

    artifacts = Path(args.artifacts_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    results = []
    if atheris_available():
        results += fuzz_with_atheris(args.targets.split(","), args.runs, artifacts)
    else:
        print("atheris is not installed (pip install atheris): hypothesis only", flush=True)
    results += fuzz_with_hypothesis(args.examples)
    total = sum(r["inputs"] for r in results)
    failed = [r["target"] for r in results if not r["ok"]]
    print(f"fuzz run: {total:,} inputs tried in all; {'no crash' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if not any(artifacts.iterdir()):
        artifacts.rmdir()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
