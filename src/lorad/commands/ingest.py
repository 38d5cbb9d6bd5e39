"""`lorad ingest`: scan every configured source once into the buffer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorad.commands import CommandError, emit

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser("ingest", parents=[common], help="scan every configured source once into the buffer")
    p.add_argument("--quarantine", action="store_true", help="also list every quarantined input with its reason")
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    from lorad.buffer.store import Buffer, BufferError
    from lorad.config import EX_CONFIG
    from lorad.daemon.preflight import unwritable
    from lorad.sources import open_sources
    from lorad.sources.ingest import ingest

    if not settings.store.sources:
        raise CommandError("no sources configured: add a [[store.sources]] table (kind, path) to the config", 78)
    problems = unwritable(settings)  # a read-only state directory: one line, as `lorad serve` says it
    if problems:
        raise CommandError("cannot ingest: " + "; ".join(problems), EX_CONFIG)
    try:
        with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
            report = ingest(buffer, open_sources(settings.store), settings.buffer.batch_size)
            totals = buffer.counts()
            held = buffer.quarantine() if args.quarantine else []
    except BufferError as e:
        raise CommandError(str(e)) from None
    payload = report.as_dict() | {"buffer": totals}
    if args.quarantine:
        payload["quarantine"] = held
    lines = [
        f"new {report.new}  updated {report.updated}  unchanged {report.unchanged}  quarantined {report.quarantined}"
    ]
    for name, c in report.per_source.items():
        lines.append(
            f"  {name}: new {c['new']}, updated {c['updated']}, unchanged {c['unchanged']}, "
            f"quarantined {c['quarantined']}"
        )
    lines.append(
        f"buffer: {totals['artifacts']} artifacts in {totals['chains']} chains "
        f"({totals.get('chains_first_try', 0)} first-try, {totals.get('chains_refined', 0)} refined, "
        f"{totals.get('chains_exhausted', 0)} exhausted, {totals.get('chains_open', 0)} open); "
        f"{totals['quarantined']} quarantined"
    )
    for q in held:
        lines.append(f"  quarantined {q['source']}:{q['locator']}: {q['reason']}")
    for err in report.errors:
        lines.append(f"error: {err}")
    emit(args, payload, "\n".join(lines))
    return 1 if report.errors else 0
