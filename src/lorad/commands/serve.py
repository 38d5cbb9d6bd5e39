"""`lorad serve`: run the daemon in the foreground (systemd runs it as Type=notify)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser(
        "serve", parents=[common], help="run the daemon: watch the stores, schedule training, answer the other commands"
    )
    p.set_defaults(func=run)


def run(args, settings: Settings) -> int:
    from lorad.commands import CommandError

    if "sqlite_utils" not in sys.modules:
        # sqlite-utils imports pandas (and with it pyarrow) whenever it is installed, only to
        # recognise pandas values; the daemon never passes any. Hiding it keeps ~100 MB out of
        # a process that stays resident (the training worker, a separate process, is unaffected).
        # None in sys.modules makes `import pandas` raise ImportError (the import system's own
        # way to block a module); typeshed types the mapping as modules only.
        sys.modules.setdefault("pandas", None)  # type: ignore[arg-type]
    from lorad.buffer.store import BufferError
    from lorad.config import EX_CONFIG
    from lorad.daemon import memory, preflight
    from lorad.daemon.service import serve

    # Before any thread starts: glibc would give each allocating thread an arena of its own,
    # whose freed blocks stay resident (see lorad.daemon.memory).
    memory.limit_arenas(memory.ARENAS)

    # The unit file's UMask=0027, for every way of starting the daemon: the buffer, job data and
    # adapters hold users' code and prompts. Group members (the lorad group) keep read access;
    # the training worker inherits this umask. (tests/daemon/test_socket_security.py checks it.)
    os.umask(0o027)

    problems = preflight.problems(settings)  # before the buffer and the start-up scan
    if problems:
        raise CommandError("cannot start: " + "; ".join(problems), EX_CONFIG)
    _raise_fd_limit()

    try:
        return serve(settings)
    except (PermissionError, BufferError) as e:
        raise CommandError(f"cannot start the daemon: {e}") from None


def _raise_fd_limit(want: int = 8192) -> None:
    """Lift the soft RLIMIT_NOFILE towards the hard one: each control connection holds a descriptor.

    Why: systemd's default soft limit is 1024; the control server accepts up to 1024 idle
    connections (it reads them with epoll, which has no such limit).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
