"""What ``lorad serve`` checks before anything else: places it must write, a socket path that fits.

Why before: a state directory that is a file, read-only or missing its parent, or a socket
path too long for a Unix socket address, fail the same way at every restart. Found here, they
end in one line naming the key and exit 78 (EX_CONFIG), which the systemd unit does not
restart; found later they were a traceback, exit 1 and a restart every 10 s, the socket one
only after the whole start-up scan.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.daemon.protocol import socket_path_problem

if TYPE_CHECKING:
    from lorad.config import Settings


def problems(settings: Settings) -> list[str]:
    """Each problem as ``key: what is wrong``; empty when the daemon can start.

    Creates the state directory (and the buffer's and socket's folders) when missing, as
    the daemon would.
    """
    found: list[str] = []
    socket, key_of_socket = settings.daemon.socket_path, socket_key(settings)
    problem = socket_path_problem(socket)
    if problem:
        found.append(f"{key_of_socket}: {problem}")
    found += unwritable(settings, [] if problem else [(key_of_socket, socket.parent)])
    from lorad.release.gguf import PUBLISH_KINDS, base_problem, table_base

    for i, table in enumerate(settings.publish):
        if table.kind in PUBLISH_KINDS and (problem := base_problem(table_base(table, settings.training.base_model))):
            found.append(f"publish[{i}].base: {problem}")
    return found


def unwritable(settings: Settings, more: Sequence[tuple[str, Path]] = ()) -> list[str]:
    """``key: why`` for each place lorad writes that it cannot: the state directory, the
    buffer's folder, and ``more`` (key, folder). `lorad ingest` and `lorad train` check these
    too, before they open the buffer."""
    places = [("daemon.state_dir", settings.state_dir)]
    if settings.buffer.path:
        places.append(("buffer.path", settings.buffer_path.parent))
    found, seen = [], set()
    for key, path in [*places, *more]:
        if path in seen:
            continue
        seen.add(path)
        problem = writable_dir(path)
        if problem:
            found.append(f"{key}: {problem}")
    return found


def socket_key(settings: Settings) -> str:
    """The setting that decides where the socket is (for messages about it)."""
    if settings.daemon.socket:
        return "daemon.socket"
    return "$RUNTIME_DIRECTORY" if os.environ.get("RUNTIME_DIRECTORY") else "daemon.state_dir"


def writable_dir(path: Path) -> str | None:
    """Why ``path`` is not a directory this process can create files in (made when missing), or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {path} ({e.strerror})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".lorad-write-check-", dir=path)
    except OSError as e:
        return f"{path} is not writable ({e.strerror})"
    os.close(fd)
    os.unlink(probe)
    return None
