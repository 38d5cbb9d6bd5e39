"""How the CLI shows a training cycle: its outcome, the metrics side by side, its progress."""

from __future__ import annotations

from typing import Any


def outcome(o) -> str:
    """A cycle's :class:`lorad.cycle.Outcome`: the verdict with its reasons, the metrics side by side."""
    head = f"job {o.job_id}: {o.status.upper()}"
    if o.version:
        head += f" {o.version}"
    lines = [head]
    if o.training:
        t = o.training
        lines.append(
            f"trained {t.get('steps')} steps on {t.get('train_rows')} rows "
            f"({t.get('new')} new, {t.get('replayed')} replayed) in "
            f"{_secs(t.get('train_seconds'))}; final loss {_num(t.get('final_loss'))}"
        )
        if t.get("phases"):
            lines.append(
                "  phases: "
                + "; ".join(
                    f"{p['method']} {p['steps']} steps, final loss {_num(p['final_loss'])}" for p in t["phases"]
                )
            )
            lines += [f"  {p['decision']}" for p in t["phases"] if p.get("decision")]
    for r in (o.live, o.rollback):
        if r and r.get("reasons"):
            lines.append(("rolled back: " if r.get("rolled_back") else "checked: ") + "; ".join(r["reasons"]))
    if o.metrics and "candidate" in o.metrics:
        lines.append(metrics_table(o.metrics, o.baseline, o.baseline_version))
    if o.verdict:
        lines.append("verdict: " + ("promote" if o.verdict.get("promote") else "reject"))
        lines += [f"  - {r}" for r in o.verdict.get("reasons", [])]
    elif o.reason:
        lines.append(f"reason: {o.reason}")
    for p in o.publish:
        lines.append(f"publish {p['hook']}: {'ok' if p['ok'] else 'FAILED'} {p.get('detail', '')}".rstrip())
    if o.pruned:
        lines.append("pruned: " + ", ".join(o.pruned))
    return "\n".join(lines)


def metrics_table(metrics: dict, baseline: str = "active", baseline_version: str | None = None) -> str:
    """A small table: baseline and candidate (and previous, when scored) side by side."""
    label = f"{baseline} ({baseline_version or 'base model'})"
    cols = [(label, metrics.get(baseline) or {}), ("candidate", metrics.get("candidate") or {})]
    if baseline != "previous" and metrics.get("previous"):
        cols.insert(0, ("previous", metrics["previous"]))
    width = max(14, *(len(c[0]) + 2 for c in cols))
    rows = [("", [c[0] for c in cols])]
    rows.append(("held-out NLL", [_num(c[1].get("nll")) for c in cols]))
    rows.append(("perplexity", [_num(c[1].get("perplexity"), 2) for c in cols]))
    rows.append(("tokens/examples", [f"{c[1].get('tokens', '-')}/{c[1].get('examples', '-')}" for c in cols]))
    if any("epsilon" in c[1] for c in cols):
        rows.append(
            (
                "first-attempt ε",
                [
                    f"{c[1]['epsilon']:.1%} ({c[1]['accepted']}/{c[1]['generated']})" if "epsilon" in c[1] else "-"
                    for c in cols
                ],
            )
        )
    out = []
    for name, values in rows:
        out.append(f"  {name:<16}" + "".join(f"{v:>{width}}" for v in values))
    base, cand = cols[-2][1], cols[-1][1]
    if isinstance(base.get("nll"), float) and isinstance(cand.get("nll"), float) and base["nll"]:
        delta = f"  Δ NLL {(cand['nll'] - base['nll']) / base['nll']:+.2%}"
        if "epsilon" in base and "epsilon" in cand:
            delta += f", Δε {(cand['epsilon'] - base['epsilon']) * 100:+.1f} points"
        out.append(delta)
    return "\n".join(out)


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else "-"


def _secs(x) -> str:
    return f"{x:.1f}s" if isinstance(x, (int, float)) else "-"


BAR_WIDTH = 30


def duration(seconds: float | None) -> str:
    """``1h 05m``, ``3m 09s``, ``12s``, ``2d 4h`` (``?`` for None)."""
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h}h"
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def progress_line(job: dict) -> str:
    """One line for a job: its state, a text bar of its steps, loss and ETA."""
    p = job.get("progress") or {}
    line = f"job {job['job_id']}: {job['state']}"
    if job.get("stopping"):
        line += f" ({'cancelling' if job['stopping'] == 'cancel' else 'pausing'})"
    step, total = p.get("step"), p.get("total_steps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        done = min(1.0, step / total)
        filled = int(done * BAR_WIDTH)
        line += f"  [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done:4.0%} step {step}/{total}"
        if p.get("phase"):
            line += f" of the {p['phase']} phase"
    if isinstance(p.get("loss"), (int, float)):
        line += f"  loss {p['loss']:.4f}"
    if p.get("eta_s") is not None:
        line += f"  ETA {duration(p['eta_s'])}"
    return line


class JobProgress:
    """A job's progress as it runs, however it is watched (`lorad train`, `lorad train-now
    --wait`, the demo): a tqdm bar on a terminal; elsewhere, with ``lines``, a line when the
    state changes and every ``every`` steps (logs and pipes).

    Fed job rows (``state`` and ``progress``) or the worker's bare progress records.
    """

    def __init__(self, stream=None, *, enabled: bool = True, lines: bool = True, every: int = 5):
        import sys

        self.stream = stream or sys.stderr
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.lines = enabled and lines and not self.tty
        self.every = every
        self.bar: Any = None  # a tqdm bar while one is shown
        self.shown, self.last_step = "", -every

    def update(self, job: dict) -> None:
        record = job.get("progress") or {} if "state" in job else job
        state = job.get("state") or record.get("stage") or "training"
        step, total = record.get("step") or 0, record.get("total_steps") or 0
        training = state == "training" and total > 0
        if self.tty and training:
            self._bar(record, step, total)
        elif self.lines and training and (step >= self.last_step + self.every or step == total != self.last_step):
            print(
                "  " + progress_line({"job_id": job.get("job_id", "-"), "state": state, "progress": record}),
                file=self.stream,
                flush=True,
            )
            self.last_step = step
        if not training and state != self.shown:
            self.close()
            if self.lines or self.tty:
                print(f"  {state}", file=self.stream, flush=True)
        self.shown = state

    def _bar(self, record: dict, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="training", unit="step", file=self.stream, dynamic_ncols=True)
        self.bar.set_description(f"training ({record['phase']})" if record.get("phase") else "training")
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        post = {}
        if record.get("loss") is not None:
            post["loss"] = f"{record['loss']:.4f}"
        if record.get("tokens_per_s"):
            post["tok/s"] = f"{record['tokens_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
