"""Making what was written survive a power cut: fsync of a file or folder, or a whole tree."""

from __future__ import annotations

import os


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file under ``root``, then each folder (so their entries are durable too)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync(os.path.join(dirpath, name))
        fsync(dirpath)
