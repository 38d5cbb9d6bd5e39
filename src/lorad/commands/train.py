"""`lorad train --once`: one whole training cycle in the foreground, without the daemon."""

from __future__ import annotations

from lorad.commands import emit

# busy: another cycle (the daemon's) is training; 75 = EX_TEMPFAIL, try again later.
EXIT_BY_STATUS = {"promoted": 0, "rejected": 0, "skipped": 0, "failed": 1, "paused": 75, "busy": 75, "cancelled": 130}


def register(sub, common) -> None:
    p = sub.add_parser(
        "train", parents=[common],
        help="run one training cycle now in the foreground (ingest, select, train, evaluate, decide)")
    p.add_argument("--once", action="store_true", required=True,
                   help="run a single cycle and exit (required; the daemon schedules the others)")
    p.add_argument("--no-ingest", action="store_true", help="do not scan the sources first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from lorad import cycle

    outcome = cycle.run_once(settings, progress=not (args.no_progress or args.json),
                             ingest_first=not args.no_ingest)
    emit(args, outcome.as_dict(), outcome.render())
    return EXIT_BY_STATUS.get(outcome.status, 1)
