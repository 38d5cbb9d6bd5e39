"""`lorad train`: one whole training cycle in the foreground, without the daemon.

The cycle is the daemon's (:mod:`lorad.cycle`), recorded as a job of trigger ``cli``:
`lorad jobs` and `lorad report` show it beside the daemon's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorad.commands import emit

if TYPE_CHECKING:
    from lorad.config import Settings

# busy: another cycle (the daemon's) is training; 75 = EX_TEMPFAIL, try again later.
EXIT_BY_STATUS = {"promoted": 0, "rejected": 0, "skipped": 0, "failed": 1, "paused": 75, "busy": 75, "cancelled": 130}


def register(sub, common) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="run one training cycle now in the foreground (ingest, select, train, evaluate, decide)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="accepted for scripts written for older versions; `lorad train` always runs one cycle",
    )
    p.add_argument("--no-ingest", action="store_true", help="do not scan the sources first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    from lorad import cycle
    from lorad.buffer.store import BufferError
    from lorad.commands import CommandError, render
    from lorad.config import EX_CONFIG
    from lorad.daemon.preflight import unwritable

    problems = unwritable(settings)  # a read-only state directory: one line, as `lorad serve` says it
    if problems:
        raise CommandError("cannot train: " + "; ".join(problems), EX_CONFIG)
    bar = render.JobProgress(enabled=not (args.no_progress or args.json), lines=False)
    try:
        outcome = cycle.run_now(settings, ingest_first=not args.no_ingest, on_progress=bar.update)
    except BufferError as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    emit(args, outcome.as_dict(), render.outcome(outcome))
    return EXIT_BY_STATUS.get(outcome.status, 1)
