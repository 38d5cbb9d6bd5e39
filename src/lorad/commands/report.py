"""`lorad report`: a self-contained HTML page of recent jobs' loss curves and metrics across versions.

Offline: it reads the state directory (the jobs table, each job's progress.jsonl, the
registry's lorad.json records), so it works with or without a running daemon. The plots are
inline SVG drawn here; the page loads nothing from anywhere.
"""

from __future__ import annotations

import html
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorad.config import Settings

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def register(sub, common) -> None:
    p = sub.add_parser(
        "report", parents=[common], help="write an HTML report: loss curves of recent jobs, metrics across versions"
    )
    p.add_argument("--output", "-o", default="report.html", metavar="FILE", help="where to write (default report.html)")
    p.add_argument(
        "--jobs", type=int, default=10, metavar="N", help="loss curves of the N most recent jobs (default 10)"
    )
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    from lorad.commands import emit

    data = collect(settings, args.jobs)
    out = Path(args.output)
    out.write_text(render(data), encoding="utf-8")
    summary = {"ok": True, "output": str(out), "jobs": len(data["jobs"]), "versions": len(data["versions"])}
    emit(args, summary, f"wrote {out} ({summary['jobs']} jobs, {summary['versions']} versions)")
    return 0


# -- data ---------------------------------------------------------------------------------------


def collect(settings: Settings, limit: int = 10) -> dict:
    """Jobs with their loss curves, and versions with their metrics, from the state directory."""
    from lorad.buffer.job_table import JobStore
    from lorad.commands import CommandError
    from lorad.release.registry import Registry, RegistryError
    from lorad.training.jobdir import iter_progress

    jobs = []
    path = settings.buffer_path
    if path.exists():
        from lorad.buffer.store import Buffer, BufferError

        try:
            with Buffer(path, readonly=True) as buffer:  # a member of the daemon's group can read
                rows = JobStore(buffer.conn).list(limit)
        except BufferError as e:
            raise CommandError(str(e)) from None
        for job in reversed(rows):
            curve = []
            if job.get("job_dir") and Path(job["job_dir"]).is_dir():
                for rec, _ in iter_progress(job["job_dir"]):
                    if isinstance(rec.get("step"), int) and _finite(rec.get("loss")):
                        curve.append((rec["step"], float(rec["loss"])))
            jobs.append({**job, "curve": curve})
    elif not settings.state.adapters.exists():
        raise CommandError(f"nothing to report: no buffer at {path} and no adapters in {settings.state_dir}")
    from lorad.evaluation.live import live_rates

    reg = Registry(settings.state.adapters)
    versions = []
    live = live_rates(settings, reg.names())
    for name in reg.names():
        try:
            v = reg.get(name)
        except RegistryError:
            continue
        m = v.record.get("metrics") or {}
        label = (v.record.get("compared_with") or {}).get("label") or "active"
        cand, ref = m.get("candidate") or {}, m.get(label) or m.get("active") or {}
        cand_nll, ref_nll = _num(cand.get("nll")), _num(ref.get("nll"))
        versions.append(
            {
                "version": name,
                "number": v.number,
                "verdict": v.verdict,
                "promoted": bool(v.verdict.get("promote")) if isinstance(v.verdict, dict) else None,
                "candidate_nll": cand_nll,
                "reference_nll": ref_nll,
                # relative held-out improvement over what served when the candidate was trained
                "improvement": (ref_nll - cand_nll) / ref_nll if cand_nll is not None and ref_nll else None,
                # ε: first-attempt acceptance by the guard (only when evaluation.guard_command is set)
                "candidate_epsilon": _num(cand.get("epsilon")),
                "reference_epsilon": _num(ref.get("epsilon")),
                # the generator's traffic while it served (evaluation.live_metadata_key)
                "live": live[name].as_dict() if name in live and live[name].attempts else None,
            }
        )
    return {
        "jobs": jobs,
        "versions": versions,
        "current": reg.current(),
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x):
    return float(x) if _finite(x) else None


# -- drawing ------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = max((hi - lo) / n, 1.0) if integer else (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12:
        out.append(round(v, 12))
        v += step
    return out


def line_chart(
    series: list[tuple[str, list[tuple[float, float]]]],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 720,
    height: int = 300,
    integer_x: bool = False,
) -> str:
    """An SVG line chart: one polyline (with points) per series, axes with ticks, a legend.

    Styles are attributes, not CSS classes, so the SVG looks the same cut out of the page.
    """
    points = [p for _, pts in series for p in pts]
    if not points:
        return f'<p class="empty">{html.escape(title)}: no data yet.</p>'
    left, right, top, bottom = 64, 170, 30, 44
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or abs(y0) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    e = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(title)}">',
        f'<text x="{left}" y="18" {TITLE}>{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
    ]
    for t in _ticks(y0, y1):
        y = sy(t)
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" {TICK} text-anchor="end">{t:g}</text>'
        )
    for t in _ticks(x0, x1, 6, integer_x):
        x = sx(t)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#999"/>'
            f'<text x="{x:.1f}" y="{top + ph + 16}" {TICK} text-anchor="middle">{t:g}</text>'
        )
    out.append(f'<text x="{left + pw / 2}" y="{height - 8}" {LABEL} text-anchor="middle">{e(xlabel)}</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2}" {LABEL} text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2})">{e(ylabel)}</text>'
    )
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        if not pts:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(pts) <= 60:
            out.extend(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                f"<title>{e(name)}: {x:g}, {y:.4g}</title></circle>"
                for x, y in pts
            )
        ly = top + 12 + i * 16
        out.append(
            f'<rect x="{left + pw + 12}" y="{ly - 8}" width="12" height="3" fill="{color}"/>'
            f'<text x="{left + pw + 30}" y="{ly - 3}" {LEGEND}>{e(name[:22])}</text>'
        )
    out.append("</svg>")
    return "".join(out)


FONT = 'font-family="system-ui, sans-serif"'
TITLE = f'{FONT} font-size="13" font-weight="600" fill="#222"'
TICK = f'{FONT} font-size="11" fill="#555"'
LABEL = f'{FONT} font-size="12" fill="#333"'
LEGEND = f'{FONT} font-size="11" fill="#222"'

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
.empty{color:#777;font-style:italic}.promoted{color:#2a7a2a}.rejected{color:#a33}.failed{color:#a33}
"""


def render(data: dict) -> str:
    e = html.escape
    curves = [(_job_label(j["job_id"]), j["curve"]) for j in data["jobs"] if j["curve"]]
    versions = data["versions"]
    nll = [
        ("candidate", [(v["number"], v["candidate_nll"]) for v in versions if v["candidate_nll"] is not None]),
        ("reference", [(v["number"], v["reference_nll"]) for v in versions if v["reference_nll"] is not None]),
    ]
    improvement = [("improvement", [(v["number"], v["improvement"]) for v in versions if v["improvement"] is not None])]
    epsilon = [
        ("candidate", [(v["number"], v["candidate_epsilon"]) for v in versions if v["candidate_epsilon"] is not None]),
        ("reference", [(v["number"], v["reference_epsilon"]) for v in versions if v["reference_epsilon"] is not None]),
    ]
    served = [v for v in versions if v["live"]]
    live_first = [("first-try rate", [(v["number"], v["live"]["first_try"]) for v in served])]
    live_attempts = [("mean attempts", [(v["number"], v["live"]["mean_attempts"]) for v in served])]
    rows = "".join(
        f'<tr><td>{e(j["job_id"])}</td><td class="{e(j["state"])}">{e(j["state"])}</td><td>{e(j["trigger"])}</td>'
        f"<td>{datetime.fromtimestamp(j['created_at'], timezone.utc):%Y-%m-%d %H:%M}</td>"
        f"<td>{e(j.get('version') or '')}</td><td>{e((j.get('reason') or '')[:120])}</td></tr>"
        for j in reversed(data["jobs"])
    )
    vrows = "".join(
        f"<tr><td>{e(v['version'])}{' (current)' if v['version'] == data['current'] else ''}</td>"
        f"<td>{_fmt(v['candidate_nll'])}</td><td>{_fmt(v['reference_nll'])}</td><td>{_fmt(v['improvement'])}</td>"
        f"<td>{_fmt(v['candidate_epsilon'])}</td>"
        f"<td>{_live_cell(v['live'])}</td>"
        f"<td>{'promote' if v['promoted'] else 'reject'}: "
        f"{e('; '.join((v['verdict'] or {}).get('reasons', []))[:200])}</td>"
        "</tr>"
        for v in reversed(versions)
    )
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>lorad report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>lorad report</h1>",
        f"<p>Generated {e(data['generated'])}. Active version: <b>{e(data['current'] or 'none (base model)')}</b>.</p>",
        "<h2>Training loss of recent jobs</h2>",
        line_chart(curves, "training loss per step", "step", "loss"),
        "<h2>Held-out loss across versions</h2>",
        line_chart(
            [s for s in nll if s[1]],
            "held-out NLL (candidate vs the adapter serving when it was trained)",
            "version",
            "NLL",
            integer_x=True,
        ),
        line_chart(
            improvement, "relative held-out NLL improvement of each candidate", "version", "improvement", integer_x=True
        ),
        "<h2>First-attempt acceptance ε across versions</h2>",
        line_chart(
            [s for s in epsilon if s[1]],
            "ε: share of generated first attempts the guard accepted",
            "version",
            "ε",
            integer_x=True,
        )
        if epsilon[0][1]
        else '<p class="empty">ε not measured (set evaluation.guard_command to guard generated first attempts).</p>',
        "<h2>The generator's traffic per version</h2>",
        (
            line_chart(
                live_first,
                "live first-try rate: first attempts the guard accepted while the version served",
                "version",
                "first-try rate",
                integer_x=True,
            )
            + line_chart(
                live_attempts,
                "mean attempts per task while the version served (1.0 = no retries)",
                "version",
                "attempts",
                integer_x=True,
            )
        )
        if served
        else '<p class="empty">No traffic tagged with a version (the generator records it in each artifact\'s '
        "metadata under evaluation.live_metadata_key).</p>",
    ]
    parts += [
        "<h2>Jobs</h2>",
        "<table><tr><th>job</th><th>state</th><th>trigger</th><th>created (UTC)</th><th>version</th>"
        f"<th>reason</th></tr>{rows}</table>"
        if rows
        else '<p class="empty">No jobs yet.</p>',
        "<h2>Versions</h2>",
        "<table><tr><th>version</th><th>NLL</th><th>reference NLL</th><th>improvement</th><th>ε</th>"
        f"<th>live first try, attempts</th><th>verdict</th></tr>{vrows}</table>"
        if vrows
        else '<p class="empty">No versions yet.</p>',
        "<script type=application/json id=data>"
        + json.dumps(
            {"jobs": [{"job_id": j["job_id"], "curve": j["curve"]} for j in data["jobs"]], "versions": versions},
            default=str,
        ).replace("</", "<\\/")
        + "</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _job_label(job_id: str) -> str:
    """job-20261121T232046Z-b870 -> 11-21 23:20 b870 (fits the legend)."""
    m = re.match(r"job-\d{4}(\d\d)(\d\d)T(\d\d)(\d\d)\d\dZ-(\w+)$", job_id)
    return f"{m[1]}-{m[2]} {m[3]}:{m[4]} {m[5]}" if m else job_id


def _live_cell(live: dict | None) -> str:
    if not live:
        return ""
    return f"{live['first_try']:.0%} ({live['accepted']}/{live['attempts']}), {live['mean_attempts']:.2f}"


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4g}"
