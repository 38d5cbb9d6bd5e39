"""`lorad demo`: the whole loop end to end in a fresh directory (what `make demo` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser(
        "demo", parents=[common], help="run the whole loop end to end: store, daemon, training, gate, status, history"
    )
    p.add_argument(
        "--tiny", action="store_true", help="a tiny model built on the spot instead of SmolLM2-135M (under a minute)"
    )
    p.add_argument("--dir", type=Path, help="where to put everything (default: ./lorad-demo-<time>, must not exist)")
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    from lorad import demo
    from lorad.commands import CommandError

    if args.dir is not None and args.dir.exists():
        raise CommandError(f"{args.dir} already exists: the demo starts in a fresh directory")
    try:
        return demo.run(args.dir.resolve() if args.dir else None, tiny=args.tiny)
    except demo.DemoError as e:
        raise CommandError(f"demo: {e}") from None
