"""`lorad serve`: the long-running service that ties the parts together.

Threads: the main loop (this module: signals, scheduling, systemd, the status snapshot), the
ingest loop (the buffer's writer: watcher batches, reconciliation, feedback), the control
server (a selector thread and its workers) and, while a job runs, the job thread (which runs
the worker subprocess). Signal handlers only set flags; the main loop acts on them. Control
requests that change state are handed to the main loop and answered when it has acted;
``status`` is answered from an in-memory snapshot the main loop refreshes, so it never waits
on SQLite writes or the worker. The daemon never imports torch.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone

import structlog

from lorad import config as config_mod
from lorad import events, release
from lorad.buffer.job_table import FINAL, JobNotFound, JobStore
from lorad.buffer.store import Buffer
from lorad.config import ConfigError, Settings
from lorad.daemon import protocol
from lorad.daemon.control import Access, ControlServer, Peer, SocketInUse
from lorad.daemon.metrics import ListenFailed, Metrics, cycle_values
from lorad.daemon.runner import JobRunner
from lorad.daemon.schedule import Schedule, backoff_delay, decide, gpu_busy
from lorad.daemon.systemd import Notifier
from lorad.daemon.waker import Waker
from lorad.daemon.watcher import IngestLoop, Watcher
from lorad.release import gpu_share
from lorad.release.registry import Registry

log = structlog.get_logger()

TICK = 0.1  # seconds between main-loop passes
SNAPSHOT_EVERY = 0.5  # seconds between status-count refreshes
FEEDBACK_WAIT = 25.0  # seconds a feedback request waits for its commit (the client waits 30 by default)
DECIDE_EVERY = 1.0  # seconds between scheduler decisions (sooner when asked)
STOP_TIMEOUT = 60.0  # seconds a running job gets to checkpoint at shutdown
CONCLUDE_WAIT = 5.0  # seconds shutdown gives a conclusion in progress when no publish hook bounds it
STATUS_CACHE_KIB = 2048  # page cache of the status connection


class Service:
    """The daemon. ``run()`` returns the process exit code.

    Args:
        settings: the validated configuration (re-read from ``settings.source_path`` on reload).
        environ: where systemd's NOTIFY_SOCKET / WATCHDOG_USEC are read (os.environ).
    """

    def __init__(self, settings: Settings, environ=None):
        self.settings = settings
        # One registry for the daemon's reads (status twice a second, metrics): its caches of
        # pointer logs and verified versions live on it. (A reload cannot move state_dir.)
        self.registry = Registry(settings.state.adapters)
        self.notifier = Notifier(environ, watchdog=settings.daemon.watchdog)
        self.schedule = _schedule(settings)
        self._signals: set[int] = set()
        self._actions: queue.SimpleQueue = queue.SimpleQueue()
        self._decide_now = True
        self._snapshot: dict = {"state": "starting"}
        self._snapshot_begun = 0.0  # when the snapshot now shown started reading
        self._snap_lock = threading.Lock()
        self._change_lock = threading.Lock()  # guards _change
        self._change: Future | None = None  # the promote/rollback running (one at a time, off the main loop)
        self.started = time.time()
        self.runner: JobRunner | None = None
        self.scheduling_paused = False
        self.failures = 0
        self.backoff_until = 0.0
        self.last_decision = ""
        self._last_status_line = ""
        self.reloads = 0
        self._ready = False
        self._stopping = False

    # -- start and stop -------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        try:
            self.start()
        except (SocketInUse, ListenFailed) as e:
            log.error(events.DAEMON_START_FAILED, error=str(e))
            return 1
        try:
            self._loop()
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum, frame) -> None:
        self._signals.add(signum)  # the main loop acts on it

    def start(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = Buffer(s.buffer_path, s.buffer.synchronous)  # migrations run here
        self.jobs = JobStore(self.db.conn)
        from lorad.cycle import recover

        # Jobs a dead daemon left running become paused; one whose worker had finished is
        # concluded as soon as the daemon is up.
        conclude_now = recover(s, self.jobs)
        self.scheduling_paused = bool(self.jobs.get_state("scheduling_paused", False))
        self.failures = int(self.jobs.get_state("failures", 0))
        self.backoff_until = float(self.jobs.get_state("backoff_until", 0.0))
        self.reader = Buffer(s.buffer_path, readonly=True)  # status counts: never waits on writers
        # Counts and single rows: a small page cache, or it grows towards the whole buffer.
        self.reader.conn.execute(f"PRAGMA cache_size = -{STATUS_CACHE_KIB}")
        # A vLLM server left asleep by a daemon that died (its orphaned worker is stopped by now).
        self.waker = Waker(s)
        self.waker.start()
        self.metrics = Metrics(self.status, [src.key for src in s.store.sources])
        self.metrics.set_cycle_values(cycle_values(self.db.conn, self.registry))
        if s.metrics.listen:  # bound before the start-up scan: a taken port fails at once
            self.metrics.listen(s.metrics.host, s.metrics.port)
        self._start_ingest()
        self._refresh_snapshot()  # the first status answer is already a real one
        self.control = ControlServer(
            s.daemon.socket_path,
            self._handle,
            Access(s.daemon.allowed_uids, s.daemon.allowed_group),
            max_per_uid=s.daemon.max_connections_per_uid,
        )
        self.control.start()
        if conclude_now:
            self._start_job(conclude_now[0], None, "finishing a conclusion that a restart interrupted")
        self._write_textfile()
        self._ready = True
        self._last_status_line = self._status_line()
        self.notifier.ready(self._last_status_line)
        log.info(
            events.DAEMON_STARTED,
            pid=os.getpid(),
            socket=str(s.daemon.socket_path),
            state_dir=str(s.state_dir),
            sources=[src.key for src in s.store.sources],
        )

    def _start_ingest(self) -> None:
        from lorad.sources import AtomicGuardSource, open_sources

        s = self.settings
        readers = open_sources(s.store)
        # A store's objects/ tree is watched recursively; a JSONL log's folder only at its top.
        roots = [(p, isinstance(r, AtomicGuardSource)) for r in readers for p in r.watch_paths()]
        self.watcher = Watcher(roots)
        self.watcher.start()  # before the first scan: nothing written meanwhile is missed
        self.ingest = IngestLoop(
            Buffer(s.buffer_path, s.buffer.synchronous),
            readers,
            self.watcher,
            s.buffer.batch_size,
            s.schedule.debounce_seconds,
            s.schedule.reconcile_interval,
            s.store.settle_seconds,
            on_ingest=self.metrics.count_ingest,
            on_quiet=self._refresh_examples,
        )
        report = self.ingest.reconcile()  # catch up before reporting ready
        self._refresh_examples(self.ingest.buffer)  # the first status counts are current
        log.info(
            events.STORE_RECONCILED,
            new=report.new,
            updated=report.updated,
            unchanged=report.unchanged,
            quarantined=report.quarantined,
            errors=report.errors,
        )
        self.ingest.start()

    def _stop_ingest(self) -> None:
        self.ingest.stop()
        self.watcher.stop()
        self.ingest.buffer.close()

    def shutdown(self) -> None:
        self._stopping = True  # requests waiting for the main loop are answered "stopping"
        self.notifier.stopping()
        # Publish hooks in flight get at most one request's deadline: a conclusion left then
        # is finished at the next start (its journal); a promote by hand keeps its change.
        hooks_until = time.monotonic() + (release.hook_deadline(self.settings) or CONCLUDE_WAIT)
        if self.runner is not None and self.runner.is_alive():
            self._stop_job(self.runner, hooks_until)
        change = self._change
        if change is not None and not change.done():
            try:
                change.result(max(0.0, hooks_until - time.monotonic()))
            except FutureTimeout:
                log.warning(
                    events.PUBLISH_INTERRUPTED,
                    what="a promote or rollback by request",
                    reason="its publish hooks outlasted the stop; the pointer change stands",
                )
        self.control.stop()
        self.metrics.stop()
        self.waker.stop()
        self._stop_ingest()
        self.reader.close()
        self.db.close()
        log.info(events.DAEMON_STOPPED)

    def _stop_job(self, runner: JobRunner, hooks_until: float) -> None:
        """Pause the job: a worker checkpoints (STOP_TIMEOUT, then killed); a conclusion gets
        until ``hooks_until``, then is left to the next start, which finishes it from its journal
        (a hook in flight runs again, as after a crash)."""
        log.info(events.JOB_PAUSING, job_id=runner.job_id, reason="daemon stopping")
        runner.pause("daemon stopping")
        deadline = time.monotonic() + STOP_TIMEOUT
        while runner.is_alive() and time.monotonic() < deadline:
            if runner.concluding and time.monotonic() >= hooks_until:
                log.warning(
                    events.PUBLISH_INTERRUPTED,
                    what=f"job {runner.job_id}'s conclusion",
                    job_id=runner.job_id,
                    reason="its publish hooks outlasted the stop; the next start finishes the conclusion",
                )
                return
            runner.join(0.1)
        if runner.is_alive():
            runner.kill()
            runner.join(10)

    # -- the main loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        last_snapshot = last_decide = 0.0
        while True:
            if self._signals & {signal.SIGTERM, signal.SIGINT}:
                log.info(events.DAEMON_STOPPING, signal=sorted(signal.Signals(s).name for s in self._signals))
                return
            if signal.SIGHUP in self._signals:
                self._signals.discard(signal.SIGHUP)
                self.reload()
            self._run_actions()
            try:
                self._reap_job()
            except Exception:  # e.g. SQLite "disk is full" saving the failure count: keep serving
                log.exception(events.JOB_REAP_FAILED)
            now = time.monotonic()
            if self._decide_now or now - last_decide >= DECIDE_EVERY:
                self._decide_now = False
                last_decide = now
                try:
                    self._schedule_step()
                except Exception:
                    log.exception(events.SCHEDULE_STEP_FAILED)
            if now - last_snapshot >= SNAPSHOT_EVERY:
                last_snapshot = now
                try:
                    self._refresh_snapshot()
                except Exception:
                    log.exception(events.STATUS_REFRESH_FAILED)
            self.notifier.ping()
            time.sleep(TICK)

    def _run_actions(self) -> None:
        while True:
            try:
                fn, future = self._actions.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except Exception as e:
                future.set_exception(e)
                continue
            try:
                self._refresh_snapshot()  # a status asked right after sees the change
            except Exception:
                log.exception(events.STATUS_REFRESH_FAILED)
            future.set_result(result)

    def _call(self, fn, timeout: float = 30.0):
        """Run ``fn`` in the main loop (from a control thread) and return its result."""
        future: Future = Future()
        self._actions.put((fn, future))
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(0.25)
            except FutureTimeout:
                if self._stopping and future.cancel():
                    return protocol.error("the daemon is stopping")
                if time.monotonic() > deadline and future.cancel():
                    return protocol.error(f"the daemon did not get to the request within {timeout:g} s")

    # -- scheduling -----------------------------------------------------------------------------

    def _schedule_step(self) -> None:
        s = self.settings.schedule
        now = datetime.now(timezone.utc)
        window = self.schedule.open_window(now)
        queued, paused = self.jobs.waiting()
        runner = self.runner if self.runner is not None and self.runner.is_alive() else None
        running = runner.info() if runner is not None else None
        new = self._snapshot.get("buffer", {}).get("untrained_examples", 0)
        busy = gpu_busy(s.gpu_busy_percent) if running is None and (queued or paused or window) else None
        d = decide(
            window_open=window is not None,
            running=running,
            queued=queued,
            paused=paused,
            scheduling_paused=self.scheduling_paused,
            new_examples=new,
            min_new_examples=s.min_new_examples,
            gpu_busy=busy,
            now_ts=time.time(),
            backoff_until=self.backoff_until,
        )
        if d.reason != self.last_decision and d.action == "wait":
            log.debug(events.SCHEDULE_WAITED, reason=d.reason)
        self.last_decision = d.reason
        if d.action == "pause":  # decided only while a job runs
            if runner is not None and not runner.stopping:
                log.info(events.JOB_PAUSING, job_id=d.job_id, reason=d.reason)
                runner.pause(d.reason)
        elif d.action in ("start", "resume"):
            job = self.jobs.get(d.job_id) if d.job_id else self.jobs.create("window")
            window_end = window[1].timestamp() if window and job["trigger"] == "window" else None
            self._start_job(job, window_end, d.reason)

    def _start_job(self, job: dict, window_end: float | None, reason: str) -> None:
        log.info(
            events.JOB_STARTED if job["state"] == "queued" else events.JOB_RESUMED,
            job_id=job["job_id"],
            trigger=job["trigger"],
            reason=reason,
        )
        self.runner = JobRunner(self.settings, job, window_end=window_end, on_concluded=self._refresh_snapshot)
        self.runner.start()
        self._refresh_snapshot()

    def _reap_job(self) -> None:
        if self.runner is None or self.runner.is_alive():
            return
        runner, self.runner = self.runner, None
        state = runner.final_state
        if state == "failed":
            self.failures += 1
            delay = backoff_delay(
                self.failures, self.settings.schedule.backoff_initial, self.settings.schedule.backoff_max
            )
            self.backoff_until = time.time() + delay
            log.warning(events.BACKOFF_STARTED, job_id=runner.job_id, reason=runner.reason, backoff_s=delay)
        elif state == "skipped":
            # Nothing to train on although the count said there was: no failure, but no retry
            # at the next tick either.
            delay = self.settings.schedule.backoff_initial
            self.backoff_until = time.time() + delay
            log.info(events.BACKOFF_STARTED, job_id=runner.job_id, reason=runner.reason, backoff_s=delay)
        elif state in ("promoted", "rejected"):
            self.failures, self.backoff_until = 0, 0.0
        self.jobs.set_state("failures", self.failures)
        self.jobs.set_state("backoff_until", self.backoff_until)
        self._decide_now = True
        self.waker.poke()  # a wake that failed after the worker is retried now, then every 30 s
        self._refresh_snapshot()
        self._refresh_cycle_metrics()
        self._write_textfile()

    def _refresh_cycle_metrics(self) -> None:
        """The metrics that change only when a cycle ends or a version moves (main loop)."""
        try:
            self.metrics.set_cycle_values(cycle_values(self.db.conn, self.registry))
        except Exception:  # a metric a cycle late is no reason to stop serving
            log.exception(events.STATUS_REFRESH_FAILED)

    def _write_textfile(self) -> None:
        if self.settings.metrics.textfile:
            self.metrics.write_textfile(self.settings.metrics.textfile)

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> dict:
        """Re-read the config file; an invalid one is refused and the old one kept."""
        self.notifier.reloading()
        try:
            new = config_mod.load(self.settings.source_path) if self.settings.source_path else self.settings
        except ConfigError as e:
            log.error(events.CONFIG_RELOAD_REFUSED, error=str(e))
            self.notifier.status(f"config reload refused: {e}"[:200])
            self.notifier.notify("READY=1")
            return protocol.error(f"config reload refused, old config kept: {e}")
        old = self.settings
        restart_needed = [
            k
            for k, a, b in (
                ("daemon.state_dir", old.daemon.state_dir, new.daemon.state_dir),
                ("daemon.socket", old.daemon.socket_path, new.daemon.socket_path),
                ("buffer.path", old.buffer_path, new.buffer_path),
                ("metrics.listen", old.metrics.listen, new.metrics.listen),
            )
            if a != b
        ]
        if restart_needed:
            log.warning(events.CONFIG_RELOAD_PARTIAL, restart_needed=restart_needed)
            new = _keep_location(new, old)
        self.settings = new
        self.schedule = _schedule(new)
        self.control.access = Access(new.daemon.allowed_uids, new.daemon.allowed_group)
        self.control.max_per_uid = new.daemon.max_connections_per_uid
        if (
            new.store != old.store
            or new.buffer != old.buffer
            or new.schedule.reconcile_interval != old.schedule.reconcile_interval
            or new.schedule.debounce_seconds != old.schedule.debounce_seconds
        ):
            self._stop_ingest()
            self._start_ingest()
        if new.logging != old.logging:
            from lorad import log as log_mod

            log_mod.configure(new.logging.level, new.logging.format)
        self.reloads += 1
        self._decide_now = True
        log.info(events.CONFIG_RELOADED, path=str(new.source_path), restart_needed=restart_needed)
        self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
        return {"ok": True, "reloaded": str(new.source_path), "restart_needed": restart_needed}

    # -- status ---------------------------------------------------------------------------------

    def _refresh_examples(self, buffer: Buffer) -> None:
        """In the ingest thread, once a burst of changes is over: keep the examples current."""
        from lorad.buffer import examples

        try:
            examples.refresh(buffer, self.settings.selection)
        except Exception:  # the artifacts are committed; the examples catch up on the next refresh
            log.exception(events.EXAMPLES_REFRESH_FAILED)

    def _refresh_snapshot(self, reader: Buffer | None = None) -> None:
        """Recompute what status answers; ``reader`` lets the job thread use its own connection."""
        from lorad.daemon import views

        begun = time.monotonic()
        counts = views.buffer_counts(reader or self.reader, self.registry)
        now = datetime.now(timezone.utc)
        nxt = self.schedule.next_window(now)
        running = self.runner.info() if self.runner is not None and self.runner.is_alive() else None
        if running is None:
            state = "idle" if not self.scheduling_paused else "paused"
        else:
            state = running["state"]
        snapshot = {
            "state": state,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "active_version": self.registry.current(),
            "registry_problems": self.registry.pointer_problems(),
            "buffer": counts,
            "job": running,
            "scheduling_paused": self.scheduling_paused,
            "next_window": {"start": nxt[0].isoformat(), "end": nxt[1].isoformat(), "open": nxt[0] <= now}
            if nxt
            else None,
            "schedule": {
                "windows": list(self.settings.schedule.windows),
                "min_new_examples": self.settings.schedule.min_new_examples,
                "decision": self.last_decision,
                "backoff_until": self.backoff_until or None,
                "failures": self.failures,
            },
            "ingest": {
                "last": self.ingest.last_ingest or None,
                "watch_events": self.watcher.events,
                "last_reconcile_age_s": round(time.monotonic() - self.ingest.last_reconcile, 1),
            },
            "gpu_share": gpu_share.server_states(
                self.settings.publish, gpu_share.records(JobStore((reader or self.reader).conn))
            ),
            "config": str(self.settings.source_path) if self.settings.source_path else None,
            "reloads": self.reloads,
            "torch_loaded": "torch" in sys.modules,
        }
        with self._snap_lock:
            if begun < self._snapshot_begun:
                return  # the job thread published a newer one while this one was reading
            self._snapshot, self._snapshot_begun = snapshot, begun
        line = self._status_line()
        if self._ready and line != self._last_status_line:
            self._last_status_line = line
            self.notifier.status(line)

    def _status_line(self) -> str:
        snap = self._snapshot
        job = snap.get("job")
        if job:
            p = job.get("progress") or {}
            step = f" step {p.get('step')}/{p.get('total_steps')}" if p.get("total_steps") else ""
            if step and p.get("phase"):
                step += f" ({p['phase']})"
            return f"job {job['job_id']} {job['state']}{step}"
        b = snap.get("buffer", {})
        return (
            f"{snap.get('state', 'starting')}; {b.get('artifacts', 0)} artifacts, "
            f"{b.get('untrained_examples', 0)} examples not yet trained on"
        )

    def status(self) -> dict:
        with self._snap_lock:
            snap = dict(self._snapshot)
        runner = self.runner
        if runner is not None and runner.is_alive():
            snap["job"] = runner.info()  # live progress, from memory
        else:
            snap["job"] = None
        return {"ok": True, **snap}

    # -- requests -------------------------------------------------------------------------------

    def _handle(self, request: dict, peer: Peer, gone) -> dict:
        """One request, dispatched by :data:`protocol.COMMANDS`: its arguments parsed into their
        dataclass, then its handler (``_on_<command>``) run where the table says."""
        name = request["command"]
        command = protocol.COMMANDS[name]
        try:
            args = protocol.parse_arguments(request)
        except protocol.BadArguments as e:
            return protocol.error(str(e))
        if command.where in ("main", "release"):  # the ones that change something are logged
            log.info(events.CONTROL_COMMAND_RECEIVED, command=name, uid=peer.uid)
        if command.where == "release":
            return self._change_version(name, args, gone)
        handler = getattr(self, f"_on_{name}")
        if command.where == "main":
            return self._call(lambda: handler(args))
        if command.where == "reader":
            with Buffer(self.settings.buffer_path, readonly=True) as ro:
                return handler(args, ro)
        return handler(args)

    # -- answered from memory, or read-only -------------------------------------------------

    def _on_ping(self, args) -> dict:
        return {"ok": True, "pid": os.getpid()}

    def _on_status(self, args) -> dict:
        return self.status()

    def _on_jobs(self, args: protocol.JobsArguments, ro: Buffer) -> dict:
        return {"ok": True, "jobs": JobStore(ro.conn).list(args.limit)}

    def _on_job(self, args: protocol.JobArguments, ro: Buffer) -> dict:
        try:
            job = JobStore(ro.conn).get(args.job_id)
        except JobNotFound as e:
            return protocol.error(str(e))
        if self.runner is not None and self.runner.job_id == job["job_id"]:
            job.update(self.runner.info())
        job["events"] = JobStore(ro.conn).events(job["job_id"])
        return {"ok": True, "job": job}

    def _on_history(self, args, ro: Buffer) -> dict:
        from lorad.release.history import history

        return {"ok": True, **history(self.settings)}

    def _on_feedback(self, args: protocol.FeedbackArguments) -> dict:
        from lorad.daemon import feedback

        def task(buffer: Buffer):
            response = feedback.write_feedback(buffer, args.record, update=args.update)
            self.ingest.mark_changed()
            return response

        # Acknowledged only after the commit; a write still queued past FEEDBACK_WAIT is
        # answered as pending (it will commit) before the client's default 30 s run out.
        return feedback.acknowledge(self.ingest.submit(task), FEEDBACK_WAIT)

    # -- state changes, in the main loop ------------------------------------------------------

    def _on_train_now(self, args) -> dict:
        job = self.jobs.create("manual")
        self._decide_now = True
        log.info(events.JOB_QUEUED, job_id=job["job_id"], trigger="manual")
        return {"ok": True, "job": job}

    def _on_cancel(self, args: protocol.JobArguments) -> dict:
        job_id = args.job_id
        try:
            job = self.jobs.get(job_id)
        except JobNotFound as e:
            return protocol.error(str(e))
        if self.runner is not None and self.runner.job_id == job_id and self.runner.is_alive():
            self.runner.cancel("cancelled by request")
            return {"ok": True, "job_id": job_id, "state": "cancelling"}
        if job["state"] in FINAL:
            return protocol.error(f"job {job_id} already ended ({job['state']})")
        self.jobs.transition(job_id, "cancelled", "cancelled by request")
        log.info(events.JOB_CANCELLED, job_id=job_id, reason="cancelled by request")
        return {"ok": True, "job_id": job_id, "state": "cancelled"}

    def _on_pause(self, args) -> dict:
        return self._set_paused(True)

    def _on_resume(self, args) -> dict:
        return self._set_paused(False)

    def _set_paused(self, paused: bool) -> dict:
        self.scheduling_paused = paused
        self.jobs.set_state("scheduling_paused", paused)
        self._decide_now = True
        log.info(events.SCHEDULING_PAUSED if paused else events.SCHEDULING_RESUMED)
        self._refresh_snapshot()
        return {"ok": True, "scheduling_paused": paused}

    def _on_reload(self, args) -> dict:
        return self.reload()

    # -- promote and rollback, in a thread of their own ---------------------------------------

    def _change_version(self, command: str, args: protocol.ChangeArguments, gone) -> dict:
        """promote/rollback in a thread of its own (``lorad-release``), one at a time.

        Why a thread: the publish hooks may wait on a hung server (timeout x attempts); the
        main loop must keep pinging systemd's watchdog meanwhile, and the control worker that
        took the request waits only while its client does (``gone()``): one that gave up stops
        holding a worker, and the change goes on. A second request while one runs is refused
        at once, so hand changes never hold more than one worker. The registry's own lock
        serialises pointer changes with a concluding job.
        """
        version, reason = args.version, args.reason or None
        if command == "promote" and not version:
            return protocol.error("promote needs a VERSION")
        concluding = self._call(
            lambda: self.runner is not None and self.runner.is_alive() and self.runner.state == "evaluating"
        )
        if concluding:
            return protocol.error("a job is concluding; try again in a moment")
        with self._change_lock:
            if self._change is not None and not self._change.done():
                return protocol.error(
                    f"{command}: another promote or rollback is still running (its publish "
                    "hooks may be waiting on a server); try again when it ends"
                )
            future = self._change = Future()
        threading.Thread(
            target=self._run_change, args=(command, version, reason, future), name="lorad-release", daemon=True
        ).start()
        while True:
            try:
                return future.result(0.2)
            except FutureTimeout:
                if gone():
                    log.info(
                        events.CONTROL_CLIENT_LEFT,
                        command=command,
                        version=version,
                        reason="the change goes on without its client",
                    )
                    return protocol.error("the client went away")  # read by no one; frees the worker
                if self._stopping:
                    return protocol.error(
                        f"the daemon is stopping; `lorad history` shows whether the {command} was made"
                    )

    def _run_change(self, command: str, version: str | None, reason: str | None, future: Future) -> None:
        from lorad.release.registry import RegistryError

        try:
            with Buffer(self.settings.buffer_path, self.settings.buffer.synchronous) as buffer:
                if command == "promote":
                    if not version:  # the command table makes it required
                        raise RegistryError("promote needs a version")
                    done = release.promote(self.settings, buffer, version, reason=reason or "promoted by hand")
                else:
                    done = release.rollback(
                        self.settings, buffer, version or None, reason=reason or "rolled back by hand"
                    )
            self._call(self._refresh_cycle_metrics)  # the main loop refreshes the status snapshot after an action
            future.set_result({"ok": True, **done})
        except RegistryError as e:
            future.set_result(protocol.error(str(e)))
        except Exception as e:  # the daemon outlives any one request
            log.exception(events.REQUEST_FAILED, command=command)
            future.set_result(protocol.error(f"internal error: {type(e).__name__}: {e}"))


def _schedule(settings: Settings) -> Schedule:
    s = settings.schedule
    return Schedule(s.windows, s.timezone, s.weekdays)


def _keep_location(new: Settings, old: Settings) -> Settings:
    import dataclasses

    daemon = dataclasses.replace(new.daemon, state_dir=old.daemon.state_dir, socket=str(old.daemon.socket_path))
    buffer = dataclasses.replace(new.buffer, path=str(old.buffer_path))
    metrics = dataclasses.replace(new.metrics, listen=old.metrics.listen, allow_remote=old.metrics.allow_remote)
    return dataclasses.replace(new, daemon=daemon, buffer=buffer, metrics=metrics)


def serve(settings: Settings) -> int:
    """Run the daemon until SIGTERM; the exit code for the process."""
    return Service(settings).run()
