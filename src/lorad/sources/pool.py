"""Parsing in worker processes, for scans with many files to read.

Reading, hashing and validating a file is pure Python work, and the thread that commits to
SQLite holds the same interpreter lock: in one process the two take turns. A scan with
thousands of new files hands them to worker processes in chunks instead, and takes the
results back in order, so batches (and what they commit) are the same as in one process.

Workers come from a ``forkserver``: the daemon runs threads (watcher, scheduler, control
socket), and forking a threaded process can copy a lock some other thread holds. The server
imports the reader module and the main script once (a worker would otherwise import the
script again itself), so a worker starts in a few milliseconds once the server runs (~150 ms
for the first, which starts the server).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

import structlog

from lorad import events

log = structlog.get_logger()

T = TypeVar("T")
R = TypeVar("R")

# Below this many files a scan parses in its own process: starting workers costs more.
MIN_PARALLEL_FILES = 2000
WORKER_NICENESS = 10  # added to the scanning process's niceness in each worker


def worker_count(configured: int) -> int:
    """Worker processes to use: ``configured``, or with 0 two, and none on a single CPU.

    Two even on two CPUs: the workers run below the writer's priority, so it keeps its
    core, and a second worker takes the time the writer spends waiting (for the disk, for
    the interpreter). Measured on 2 CPUs, 20k new files: one worker parsed a chunk in 5-12 ms
    beside the writer, 4.5 ms alone, and the writer waited for it; two gave a first scan
    ~14 % faster (median of 15 runs). More than two only wait for the writer."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return 0 if cpus < 2 else 2


def ordered_map(
    fn: Callable[[T], R], chunks: Sequence[T], workers: int, preload: str, ahead: int = 0, head: int = 0
) -> Iterator[R]:
    """``fn`` over ``chunks``, results in order; in ``workers`` processes when that helps.

    The first ``head`` chunks are done in this process while the workers start (a tenth of
    a second or more), so the consumer has work at once. Up to ``ahead`` chunks (at least two
    per worker) are in flight: enough that the workers keep going while the consumer is busy
    with what it took (a reader's consumer commits a whole batch at a time), and no more,
    since results wait in memory until taken.

    If the pool cannot start or a worker dies, the chunks not yet returned are done in this
    process: a scan never fails because of its helpers. Workers are started the way
    ``multiprocessing`` starts them, so a script that calls this (through ``ingest``) keeps
    its entry point under ``if __name__ == "__main__":``; heavy imports at the top of such a
    script slow the fork server's start.

    Args:
        fn: a module-level function (workers import it by name).
        preload: the module the fork server imports once (with ``__main__``), so workers
            start warm.
    """
    if workers < 1 or len(chunks) <= head + 1:
        yield from map(fn, chunks)
        return
    ahead = max(ahead, 2 * workers)
    queue: deque[Future] = deque()
    handed = head  # chunks given to the pool so far, after the head

    def hand_out() -> None:
        nonlocal handed
        while handed < len(chunks) and len(queue) < ahead:
            queue.append(pool.submit(fn, chunks[handed]))
            handed += 1

    try:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", preload])
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_yield_to_the_writer)
    except (ImportError, OSError, ValueError) as e:  # no working semaphores in a sandbox, say
        log.warning(events.PARSE_WORKERS_UNAVAILABLE, error=str(e))
        yield from map(fn, chunks)
        return
    log.debug(events.PARSE_WORKERS_STARTED, workers=workers, tasks=len(chunks), ahead=ahead, head=head)
    try:
        done = 0
        try:
            hand_out()
        except Exception as e:  # noqa: BLE001 - the pool could not start a worker
            log.warning(events.PARSE_WORKERS_FAILED, error=str(e) or type(e).__name__, remaining=len(chunks))
            queue.clear()
            yield from map(fn, chunks)
            return
        for chunk in chunks[:head]:  # an error of fn here is its own: it propagates
            yield fn(chunk)
        done = head
        try:
            while queue:
                result = queue.popleft().result()
                hand_out()
                yield result
                done += 1
        except Exception as e:  # noqa: BLE001 - a worker died (OOM killer, a signal)
            # An error of fn itself happens again below, in this process, and propagates from there.
            log.warning(events.PARSE_WORKERS_FAILED, error=str(e) or type(e).__name__, remaining=len(chunks) - done)
            for future in queue:
                future.cancel()
            queue.clear()
            yield from map(fn, chunks[done:])
    finally:
        for future in queue:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _yield_to_the_writer() -> None:
    """Run a worker below the scanning process's priority: the thread committing batches is
    what limits a scan, and the workers, batches ahead of it, can wait for a core (measured on
    2 cores: the first scan ~10% faster)."""
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
