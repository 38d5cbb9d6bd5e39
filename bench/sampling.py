"""Replay sampling and export at scale, each against a baseline measured in the same run.

Builds a buffer of N examples (default 1,000,000; two attempts per chain, written straight
into the artifacts/chains tables, then materialised by `examples.refresh` for the first
--refresh chains and bulk-inserted with the same columns for the rest), then times:

- drawing a 2,000-example replay mix (1,000 new + 1,000 replayed, retry-weighted) the way
  build_snapshot does, against `ORDER BY RANDOM() LIMIT 2000` over the same pool (the
  full-scan approach it replaces); target: under 100 ms;
- a whole build_snapshot of 2,000 SFT rows (draw + load + format);
- exporting 100,000 chat examples to JSONL, against the floor of reading the same rows and
  writing them with json.dumps and no formatting;
- examples.refresh (MinHash, LSH, split) per example.

    .venv/bin/python bench/sampling.py [--examples 1000000] [--export 100000] [--refresh 20000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from lorad.buffer import examples, sampling
from lorad.buffer.export import export
from lorad.buffer.store import Buffer
from lorad.config import SelectionSettings

VOCAB = [f"w{i:03d}" for i in range(500)]
SEL = SelectionSettings(policy="refinement", heldout_fraction=0.15, dedup_similarity=0.9, seed=0)


def fill(buffer: Buffer, n_chains: int, start: int = 0) -> None:
    """n_chains refined chains (a rejected attempt, then the accepted one), straight into SQL."""
    rng = random.Random(start)
    now = time.time()
    art, chains = [], []
    for c in range(start, start + n_chains):
        chain_id = f"c{c:08d}"
        words = " ".join(rng.choice(VOCAB) for _ in range(8))  # tasks differ in more than a number
        spec = f"Write f{c}(xs) that returns the sum of the first {c % 97} items of xs ({words})."
        ts = 1.7e9 + c
        for k, (status, body, feedback) in enumerate(
            (
                (
                    "rejected",
                    f"def f{c}(xs):\n    return sum(xs[:{c % 97 + 1}])\n",
                    f"f{c}([1]*200) returned {c % 97 + 1}",
                ),
                ("accepted", f"def f{c}(xs):\n    return sum(xs[:{c % 97}])\n", "All tests passed"),
            )
        ):
            art.append(
                (
                    "bench",
                    f"{chain_id}/{k}",
                    f"{chain_id}-{k}",
                    f"w{c}",
                    "g_coder",
                    None,
                    f"{chain_id}-{k - 1}" if k else None,
                    k + 1,
                    status,
                    None,
                    ts + k,
                    body,
                    int(status == "accepted"),
                    0,
                    feedback,
                    None,
                    spec,
                    "Return only Python code.",
                    None,
                    None,
                    "generated",
                    None,
                    None,
                    None,
                    f"h{c}-{k}",
                    chain_id,
                    now,
                    now,
                )
            )
        chains.append((chain_id, "bench", f"w{c}", "g_coder", 2, 1, None, "refined", spec, ts, ts + 1, now))
    cols = (
        "source, locator, artifact_id, workflow_id, action_pair_id, parent_action_pair_id, previous_attempt_id, "
        "attempt_number, status, created_at, created_ts, content, passed, fatal, feedback, sub_results, "
        "specification, constraints, feedback_history, dependency_artifacts, origin, metadata, messages, score, "
        "content_hash, chain_id, ingested_at, updated_at"
    )
    with buffer.transaction() as conn:
        conn.executemany(f"INSERT INTO artifacts ({cols}) VALUES ({', '.join('?' * 28)})", art)
        conn.executemany("INSERT INTO chains VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", chains)


def bulk_examples(buffer: Buffer, first_chain: int, n: int) -> None:
    """Example rows for chains already in SQL, as refresh would write them (no MinHash work)."""
    from lorad.buffer import split

    with buffer.transaction() as conn:
        next_seq = int(examples._state(conn, "next_seq", "1"))
        rows = []
        for c in range(first_chain, first_chain + n):
            task = f"t{c}"
            side = split.side(task, SEL["heldout_fraction"])
            rows.append(
                (
                    next_seq,
                    f"c{c:08d}",
                    "bench",
                    f"w{c}",
                    "g_coder",
                    "refined",
                    1 + c % 4,
                    2,
                    "generated",
                    1,
                    1.7e9 + c,
                    task,
                    f"a{c}",
                    f"x{c}",
                    f"k{c}",
                    side,
                    b"",
                    time.time(),
                )
            )
            next_seq += 1
        conn.executemany(
            "INSERT INTO examples (seq, chain_id, source, workflow_id, action_pair_id, outcome, retries, attempts, "
            "origin, generated_only, created_ts, task_key, answer_key, text_key, chain_key, split, minhash, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        examples._set_state(conn, "next_seq", str(next_seq))
        examples._set_state(conn, "chains_seen", repr(time.time() + 1))


def best(fn, repeat: int = 5) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--export", type=int, default=100_000)
    ap.add_argument("--refresh", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with Buffer(Path(tmp) / "buffer.sqlite3", synchronous="normal") as buffer:
            n_refresh = min(args.refresh, args.examples)
            fill(buffer, n_refresh)
            t = time.perf_counter()
            examples.refresh(buffer, SEL)
            refresh_s = time.perf_counter() - t
            t = time.perf_counter()
            for start in range(n_refresh, args.examples, 100_000):
                count = min(100_000, args.examples - start)
                fill(buffer, count, start)
                bulk_examples(buffer, start, count)
            built = time.perf_counter() - t
            print(
                f"refresh: {n_refresh:,} chains -> examples in {refresh_s:.1f} s "
                f"({refresh_s / max(n_refresh, 1) * 1e6:.0f} us per example: MinHash, LSH, split, dedup)"
            )
            print(
                f"buffer: {args.examples:,} examples ({2 * args.examples:,} artifacts); the rest bulk-written "
                f"in {built:.1f} s"
            )

            total = buffer.conn.execute("SELECT count(*) FROM examples").fetchone()[0]
            max_seq = buffer.conn.execute("SELECT max(seq) FROM examples").fetchone()[0]
            since = max_seq - max_seq // 10
            policy, ctx = examples.policy_and_context(SEL)
            where, params = examples._pool_where(policy, ctx, "train", examples.SUCCESSES)
            conn = buffer.conn

            def probe(seqs):
                return dict(
                    conn.execute(
                        f"SELECT seq, retries FROM examples WHERE seq IN (SELECT value FROM json_each(?)) AND {where}",
                        (json.dumps(seqs), *params),
                    )
                )

            def scan(lo, hi):
                return conn.execute(
                    f"SELECT seq, retries FROM examples WHERE seq > ? AND seq <= ? AND {where}", (lo, hi, *params)
                ).fetchall()

            def mix():  # as build_snapshot draws
                rng = random.Random(1)
                new = sampling.draw(1000, since, max_seq, probe, scan, rng)
                top = conn.execute("SELECT max(retries) FROM examples").fetchone()[0]
                old = sampling.draw(1000, 0, since, probe, scan, rng, "retries", top)
                return new + old

            def order_by_random():
                new = conn.execute(
                    f"SELECT seq FROM examples WHERE seq > ? AND {where} ORDER BY RANDOM() LIMIT 1000", (since, *params)
                ).fetchall()
                old = conn.execute(
                    f"SELECT seq FROM examples WHERE seq <= ? AND {where} ORDER BY RANDOM() LIMIT 1000",
                    (since, *params),
                ).fetchall()
                return new + old

            mix_s, drawn = best(mix)
            assert len(set(drawn)) == 2000
            base_s, _ = best(order_by_random, 3)
            print(
                f"replay mix of 2,000 from {total:,} examples: {mix_s * 1e3:.1f} ms "
                f"(target < 100 ms); ORDER BY RANDOM(): {base_s * 1e3:.1f} ms; ratio {base_s / mix_s:.1f}x faster"
            )
            snap_s, snap = best(
                lambda: examples.build_snapshot(
                    buffer,
                    dataclasses.replace(SEL, seed=1, replay_weighting="retries"),
                    method="sft",
                    n=2000,
                    replay_ratio=0.5,
                    since_seq=since,
                    max_heldout=0,
                ),
                3,
            )
            print(
                f"build_snapshot, 2,000 SFT rows (draw + load + format): {snap_s * 1e3:.0f} ms "
                f"(new {snap.stats['new']}, replayed {snap.stats['replayed']})"
            )

        with Buffer(Path(tmp) / "export.sqlite3", synchronous="normal") as small:
            fill(small, args.export)
            examples.refresh(small, SEL)
            out = Path(tmp) / "chat.jsonl"

            def run_export():
                with open(out, "w", encoding="utf-8") as f:
                    return export(small, f, fmt="chat", policy=policy, ctx=ctx, conditioning="both", split="all")

            exp_s, report = best(run_export, 1)

            def floor():
                with open(os.devnull, "w") as f:
                    for row in small.conn.execute("SELECT specification, content, feedback FROM artifacts"):
                        f.write(json.dumps(row) + "\n")

            floor_s, _ = best(floor, 1)
            size = out.stat().st_size
            print(
                f"export of {report.lines:,} chat examples: {exp_s:.1f} s ({report.lines / exp_s:,.0f}/s, "
                f"{size / 1e6:.0f} MB); floor (read + json.dumps of the raw rows): {floor_s:.1f} s; "
                f"ratio {exp_s / floor_s:.1f}x the floor"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
