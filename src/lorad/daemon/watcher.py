"""Watch the configured stores and ingest what changes, soon after it changes.

:class:`Watcher` turns watchdog (inotify) events into a set of changed paths. :class:`IngestLoop`
is the one thread that writes artifacts into the buffer: it waits for paths, lets them settle
for ``debounce`` seconds, and feeds them to the same idempotent :func:`lorad.sources.ingest.ingest`
as ``lorad ingest``. inotify drops events when its queue overflows (a burst of some 20,000
files on a busy machine): watchdog rebuilds its watches and says so only in its log, so the
watcher listens to that log and the loop scans everything at once. Every ``reconcile_interval``
seconds the loop also scans everything; a scan of an unchanged store only stats files. Other
buffer writes the daemon must serialise with ingest (``lorad feedback``) are submitted to the
same thread.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from lorad import events
from lorad.config import BufferSettings
from lorad.daemon import memory
from lorad.sources.ingest import IngestReport, ingest

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer

log = structlog.get_logger()

# watchdog (6-7) reports a kernel queue overflow only as a warning of these loggers' children:
# "Inotify queue overflowed; filesystem events were lost".
WATCHDOG_LOGGER = "watchdog.observers"


class _OverflowListener(logging.Handler):
    """Turns watchdog's log record of an inotify queue overflow into a call."""

    def __init__(self, on_overflow: Callable[[], None]):
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class Watcher(FileSystemEventHandler):
    """Collects the paths watchdog reports under ``roots``.

    Args:
        roots: directories to watch, each a path (watched recursively) or a (path, recursive)
            pair; one that does not exist yet is retried by :meth:`rewatch` (the
            reconciliation scan covers it meanwhile).
    """

    def __init__(self, roots: Iterable[Path | tuple[Path, bool]]):
        self.roots = [(Path(r[0]), bool(r[1])) if isinstance(r, tuple) else (Path(r), True) for r in roots]
        self._observer: BaseObserver | None = None
        # root -> (its watch, (st_dev, st_ino) of the directory watched, None if it went at once)
        self._watched: dict[Path, tuple[ObservedWatch, tuple[int, int] | None]] = {}
        # watched once, deleted or replaced since: watched again when back (-> the directory a
        # try to watch failed on, so that it is not retried, and warned of, every second)
        self._gone: dict[Path, tuple[int, int] | None] = {}
        self._deleted: set[Path] = set()  # roots whose own deletion an event reported
        self._paths: set[str] = set()
        self._overflowed = False  # events were lost since the last overflowed() call
        self._listener = _OverflowListener(self._on_overflow)
        self._cond = threading.Condition()
        self.events = 0

    def start(self) -> None:
        observer = self._observer = Observer(timeout=0.1)
        observer.daemon = True
        watchdog_log = logging.getLogger(WATCHDOG_LOGGER)
        if watchdog_log.getEffectiveLevel() > logging.WARNING:
            watchdog_log.setLevel(logging.WARNING)
        watchdog_log.addHandler(self._listener)
        self.rewatch()
        observer.start()

    def rewatch(self) -> None:
        """Start watching roots that appeared since the last try."""
        for root, recursive in self.roots:
            if root in self._watched or root in self._gone:
                continue
            if not root.is_dir():
                log.warning(events.SOURCE_NOT_WATCHED, path=str(root), reason="directory does not exist (yet)")
                continue
            self._schedule(root, recursive)

    def _schedule(self, root: Path, recursive: bool) -> bool:
        if self._observer is None:  # not started, or stopped
            return False
        try:
            identity = _identity(root)
            watch = self._observer.schedule(self, str(root), recursive=recursive)
        except OSError as e:  # e.g. the inotify watch limit, or gone again
            log.warning(events.SOURCE_NOT_WATCHED, path=str(root), reason=str(e))
            return False
        self._watched[root] = (watch, identity)
        return True

    def check(self) -> list[Path]:
        """Watch again the roots that were deleted and made anew, or replaced by another directory.

        inotify watches a directory, not a path: after ``rm -rf store; mkdir store`` (or
        ``mv store old; mkdir store``) the old watch reports nothing of the new directory. A
        root whose deletion an event reported, or whose path now holds another inode, loses
        its watch; once a directory is there again it is watched (``source_rewatched``).

        Returns:
            The roots watched again, whose files the caller should scan: anything written
            before the new watch began sent no event.
        """
        with self._cond:
            deleted, self._deleted = self._deleted, set()
        back = []
        for root, recursive in self.roots:
            held = self._watched.get(root)
            if held is None and root not in self._gone:
                continue  # never watched yet: rewatch() tries it at each reconciliation
            identity = _identity(root)
            if held is not None:
                if identity == held[1] and root not in deleted:
                    continue
                self._unschedule(held[0])
                del self._watched[root]
                self._gone[root] = None
                if identity is None:
                    log.warning(
                        events.SOURCE_NOT_WATCHED,
                        path=str(root),
                        reason="directory was deleted; watched again once it is back",
                    )
            if identity is None or identity == self._gone[root]:
                continue
            if self._schedule(root, recursive):
                del self._gone[root]
                log.info(events.SOURCE_REWATCHED, path=str(root), reason="directory was replaced")
                back.append(root)
            else:
                self._gone[root] = identity
        return back

    def _unschedule(self, watch: ObservedWatch) -> None:
        if self._observer is None:  # stopped: no watch is left
            return
        try:
            self._observer.unschedule(watch)
        except KeyError:  # already gone
            pass

    def _on_overflow(self) -> None:
        with self._cond:
            self._overflowed = True
            self._cond.notify_all()

    def overflowed(self) -> bool:
        """Whether the kernel dropped events since the last call (then everything needs a scan)."""
        with self._cond:
            lost, self._overflowed = self._overflowed, False
        return lost

    def stop(self) -> None:
        logging.getLogger(WATCHDOG_LOGGER).removeHandler(self._listener)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        with self._cond:
            self._cond.notify_all()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        paths = [event.src_path]
        if getattr(event, "dest_path", ""):
            paths.append(event.dest_path)
        if event.event_type == "deleted" and event.is_directory:
            root = Path(os.fsdecode(event.src_path))
            if root in self._watched:  # the watched directory itself: its watch has ended
                with self._cond:
                    self._deleted.add(root)
                    self._cond.notify_all()
        with self._cond:
            for p in paths:
                self._paths.add(os.fsdecode(p))
            self.events += 1
            self._cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until some path changed (True) or ``timeout`` passed (False)."""
        with self._cond:
            if not self._paths:
                self._cond.wait(timeout)
            return bool(self._paths)

    def take(self) -> set[str]:
        """The changed paths since the last call; directories are expanded to their files (a
        symlink to a directory is not followed: ``ln -s .. loop`` would name the store again)."""
        with self._cond:
            paths, self._paths = self._paths, set()
        out: set[str] = set()
        for p in paths:
            if os.path.isdir(p) and not os.path.islink(p):
                for folder, _, files in os.walk(p):
                    out.update(os.path.join(folder, f) for f in files)
            else:
                out.add(p)
        return out


def _identity(path: Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the directory at ``path``, or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class IngestLoop:
    """The buffer's writer thread: debounced watcher batches, periodic reconciliation, submitted tasks.

    Args:
        buffer: the write connection this thread owns.
        readers: the configured sources.
        watcher: where changed paths come from.
        batch_size: rows per ingest transaction.
        debounce: seconds to gather events before ingesting.
        reconcile_interval: seconds between full scans.
        settle: paths are looked at once more this long after an event, for files that were
            still being written (the sources skip, not quarantine, a fresh unparsable file).
        on_ingest: called with each IngestReport that changed something (in this thread).
        on_quiet: called with the buffer, in this thread, once the buffer changed and then
            ``quiet`` seconds passed without another change (at the latest ``quiet * 10`` after
            the first change): derived tables are refreshed once per burst, not per file.
    """

    def __init__(
        self,
        buffer: Buffer,
        readers: list,
        watcher: Watcher,
        batch_size: int = BufferSettings.batch_size,
        debounce: float = 0.1,
        reconcile_interval: float = 300.0,
        settle: float = 2.0,
        on_ingest: Callable[[IngestReport], None] | None = None,
        on_quiet: Callable | None = None,
        quiet: float = 1.0,
    ):
        self.buffer = buffer
        self.readers = readers
        self.watcher = watcher
        self.batch_size = batch_size
        self.debounce = debounce
        self.reconcile_interval = reconcile_interval
        self.settle = settle
        self.on_ingest = on_ingest
        self.on_quiet = on_quiet
        self.quiet = quiet
        self._changed_first: float | None = None
        self._changed_last = 0.0
        self.last_reconcile = 0.0
        self.last_ingest = 0.0
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._retry: list[tuple[float, set[str]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reconcile(self) -> IngestReport:
        """Scan every source fully (also at start-up, before the daemon reports ready)."""
        self.watcher.rewatch()
        report = ingest(self.buffer, self.readers, self.batch_size)
        self.last_reconcile = time.monotonic()
        self._done(report, "reconcile")
        if not (report.new or report.updated or report.quarantined):
            # Nothing for on_quiet to follow (it releases then): the scan read every row's signature.
            memory.release([self.buffer.conn])
        return report

    def submit(self, fn: Callable) -> Future:
        """Run ``fn(buffer)`` in the writer thread; the future holds its result or exception."""
        future: Future = Future()
        self._tasks.put((fn, future))
        with self.watcher._cond:
            self.watcher._cond.notify_all()
        return future

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorad-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.watcher._cond:
            self.watcher._cond.notify_all()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            deadline = self.last_reconcile + self.reconcile_interval
            if self._retry:
                deadline = min(deadline, self._retry[0][0])
            if self._changed_first is not None:
                deadline = min(deadline, self._changed_last + self.quiet)
            changed = self.watcher.wait(max(0.0, min(deadline - now, 1.0)))
            if self._stop.is_set():
                break
            self._run_tasks()
            try:
                back = self.watcher.check()
                if back:
                    self._rescan(back)
                lost = self.watcher.overflowed()
                if lost:
                    log.warning(events.WATCH_EVENTS_LOST, reason="inotify queue overflowed; scanning every source")
                if lost or time.monotonic() >= self.last_reconcile + self.reconcile_interval:
                    self.watcher.take()  # the full scan covers them
                    self._retry.clear()
                    self.reconcile()
                    continue
                if changed:
                    time.sleep(self.debounce)  # let a burst of events arrive
                    paths = self.watcher.take()
                    if paths:
                        self._ingest(paths, "watch")
                        self._retry.append((time.monotonic() + self.settle + 0.1, paths))
                if self._retry and self._retry[0][0] <= time.monotonic():
                    _, paths = self._retry.pop(0)
                    self._ingest(paths, "settle")
                self._maybe_quiet()
            except Exception:  # a bad moment (disk full, locked database) must not end the loop
                log.exception(events.INGEST_LOOP_FAILED)
                time.sleep(1.0)
        self._run_tasks()

    def _run_tasks(self) -> None:
        while True:
            try:
                fn, future = self._tasks.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.buffer))
            except BaseException as e:
                future.set_exception(e)

    def _rescan(self, roots: list[Path]) -> None:
        """Scan the sources watched under ``roots`` in full (their directories were replaced)."""
        readers = [r for r in self.readers if any(Path(p) in roots for p in r.watch_paths())]
        report = ingest(self.buffer, readers, self.batch_size)
        self._done(report, "rewatch")

    def _ingest(self, paths: set[str], why: str) -> None:
        report = ingest(self.buffer, self.readers, self.batch_size, paths=sorted(paths))
        self._done(report, why)

    def mark_changed(self) -> None:
        """The buffer changed (in this thread): schedule ``on_quiet``."""
        now = time.monotonic()
        if self._changed_first is None:
            self._changed_first = now
        self._changed_last = now

    def _maybe_quiet(self) -> None:
        if self._changed_first is None or self.on_quiet is None:
            return
        now = time.monotonic()
        if now - self._changed_last >= self.quiet or now - self._changed_first >= self.quiet * 10:
            self._changed_first = None
            self.on_quiet(self.buffer)
            memory.release([self.buffer.conn])  # the burst is over: give back what it took

    def _done(self, report: IngestReport, why: str) -> None:
        self.last_ingest = time.time()
        if report.new or report.updated or report.quarantined:
            self.mark_changed()
        if self.on_ingest and (report.new or report.updated or report.quarantined or report.errors):
            self.on_ingest(report)
