"""`lorad serve`: run the daemon in the foreground (systemd runs it as Type=notify)."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common],
                       help="run the daemon: watch the stores, schedule training, answer the other commands")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from lorad.daemon.service import serve

    return serve(settings)
