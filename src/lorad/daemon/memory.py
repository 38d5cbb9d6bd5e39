"""Giving memory back after a burst: SQLite page caches, freed heap, malloc arenas.

A burst of 20,000 artifact files left the daemon at 170-260 MB resident long after it was
ingested, while it idles at under 60 MB. What it had held was freed, but not returned to the
system: each SQLite connection keeps up to its ``cache_size`` of pages (the writer reads the
whole artifacts table once per scan, for the file signatures), and glibc keeps freed blocks in
its heaps, one arena per thread that allocated (the daemon runs two dozen threads). So, once a
burst is over, :func:`release` empties the page caches of the given connections and asks glibc
to hand free pages back (``malloc_trim``); :func:`limit_arenas`, called before any thread
starts, keeps glibc from making an arena per thread. Both are no-ops where the C library is
not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sqlite3
from collections.abc import Iterable

_M_ARENA_MAX = -8  # mallopt() parameter, glibc's malloc.h
ARENAS = 2  # for `lorad serve`: the interpreter lock lets one thread allocate at a time anyway


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not (hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt")):  # glibc only
        return None
    return libc


_LIBC = _libc()


def limit_arenas(arenas: int) -> bool:
    """Let glibc's malloc use at most ``arenas`` arenas (call before threads start).

    Returns:
        Whether the limit was set (False without glibc).
    """
    return bool(_LIBC is not None and _LIBC.mallopt(_M_ARENA_MAX, arenas))


def release(connections: Iterable[sqlite3.Connection] = ()) -> None:
    """Empty the page caches of ``connections``, collect cycles, return free heap to the system.

    Costs a few milliseconds: meant for once a burst is over, not after every file.
    """
    for conn in connections:
        try:
            conn.execute("PRAGMA shrink_memory")
        except sqlite3.Error:  # closed, or busy: its cache stays until the next release
            pass
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
