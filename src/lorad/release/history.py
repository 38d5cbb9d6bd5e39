"""The history of adapter versions, as `lorad history` shows it and the socket's ``history`` answers.

One view for both: the pointers and any refused pointer, each version (newest first) with its
verdict, its held-out figures beside what it was compared with, its live traffic
(:func:`lorad.evaluation.live.live_rates`), and the registry's recent audit events. Read-only:
the registry's files and a read-only buffer connection; safe beside a running daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorad.buffer.store import Buffer, BufferError

if TYPE_CHECKING:
    from lorad.config import Settings

EVENTS = ("adapter_promoted", "adapter_rolled_back", "candidate_rejected", "adapter_change_reverted", "publish_failed")


def history(settings: Settings, limit: int | None = None) -> dict:
    """``{current, previous, problems, versions: [...], events: [...]}`` (versions newest first,
    at most ``limit``)."""
    from lorad import release
    from lorad.evaluation.live import live_rates

    reg = release.open_registry(settings)
    listed = list(reversed(reg.versions()))[:limit]
    live = live_rates(settings, [v.name for v in listed])
    cur, prev = reg.current(), reg.previous()
    rows = []
    for v in listed:
        r = v.record
        metrics = r.get("metrics") or {}
        label = (r.get("compared_with") or {}).get("label", "active")
        cand, base = metrics.get("candidate") or {}, metrics.get(label) or {}
        rows.append(
            {
                "version": v.name,
                "current": v.name == cur,
                "previous": v.name == prev,
                "created_at": r.get("created_at"),
                "job_id": r.get("job_id"),
                "parent": r.get("parent"),
                "verdict": v.verdict,
                "nll": cand.get("nll"),
                "baseline_nll": base.get("nll"),
                "epsilon": cand.get("epsilon"),
                "baseline_epsilon": base.get("epsilon"),
                "examples": (r.get("examples") or {}).get("count"),
                "record_ok": reg.record_ok(v.name),
                "live": live[v.name].as_dict() if v.name in live else None,
            }
        )
    return {
        "current": cur,
        "previous": prev,
        "problems": reg.pointer_problems(),
        "versions": rows,
        "events": _events(settings),
    }


def _events(settings: Settings) -> list[dict]:
    """Registry events from the audit table, read-only (an absent buffer gives none)."""
    if not settings.buffer_path.exists():
        return []
    try:
        with Buffer(settings.buffer_path, readonly=True) as reader:
            out = []
            for name in EVENTS:
                out += reader.events(name, limit=20)
    except BufferError:
        return []
    return sorted(out, key=lambda e: e["id"], reverse=True)
