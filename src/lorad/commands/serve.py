"""`lorad serve`: run the daemon in the foreground (systemd runs it as Type=notify)."""

from __future__ import annotations

import os
import sys


def register(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common],
                       help="run the daemon: watch the stores, schedule training, answer the other commands")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from lorad.cli import CommandError

    if "sqlite_utils" not in sys.modules:
        # sqlite-utils imports pandas (and with it pyarrow) whenever it is installed, only to
        # recognise pandas values; the daemon never passes any. Hiding it keeps ~100 MB out of
        # a process that stays resident (the training worker, a separate process, is unaffected).
        sys.modules.setdefault("pandas", None)
    from lorad.buffer.store import BufferError
    from lorad.daemon.service import serve

    # The unit file's UMask=0027, for every way of starting the daemon: the buffer, job data and
    # adapters hold users' code and prompts. Group members (the lorad group) keep read access;
    # the training worker inherits this umask. (tests/daemon/test_socket_security.py checks it.)
    os.umask(0o027)

    try:
        return serve(settings)
    except (PermissionError, BufferError) as e:
        raise CommandError(f"cannot start the daemon: {e}") from None
