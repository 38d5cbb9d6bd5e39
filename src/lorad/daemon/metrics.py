"""Prometheus metrics of the daemon: ``/metrics`` on ``metrics.listen`` and/or ``metrics.textfile``.

Nothing here queries the buffer when scraped. A scrape (in the listener's own threads) reads
three things kept in memory: the status snapshot the main loop refreshes twice a second
(:meth:`lorad.daemon.service.Service.status`), the ingest counters the ingest thread adds to
(:meth:`Metrics.count_ingest`), and the cycle values (:func:`cycle_values`: jobs by final
state, promotions, rollbacks, the last cycle, held-out scores) that the main loop recomputes
only when they can change: at start, after a job ends, after a promotion or rollback by hand.
The textfile (node_exporter's textfile collector) is rewritten atomically (a temporary file
beside it, then rename) at start and after every cycle; it leaves out the ``process_*``
metrics, which node_exporter has of its own. prometheus-client does not import torch.

The listener (:class:`Listener`) is not prometheus-client's thread-per-connection server: one
thread (``lorad-metrics``) accepts and reads request heads through a selector, so a connection
that never finishes its request costs a descriptor, not a thread; complete requests go to two
workers (``lorad-metrics-worker``) that render the exposition and send it. Each connection has
``request_seconds`` from accept to the end of its request head, and as long again to take the
answer; at most ``max_connections`` are open at once (one more closes the oldest still sending
its request). A stalled or hostile scraper so holds up nothing but itself.
"""

from __future__ import annotations

import errno
import queue
import selectors
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, exposition
from prometheus_client import core as families

from lorad import events
from lorad.release.registry import Registry

log = structlog.get_logger()

SCHEDULER_STATES = ("starting", "idle", "paused", "preparing", "training", "evaluating")
FINAL_STATES = ("promoted", "rejected", "failed", "cancelled", "skipped")
ADAPTERS = ("active", "candidate")
SPLITS = (("all", "examples"), ("train", "train"), ("heldout", "heldout"), ("duplicates", "duplicates"))

MAX_CONNECTIONS = 64  # scrape connections open at once (Prometheus keeps one per target)
REQUEST_SECONDS = 5.0  # from accept to the end of the request head, and again to take the answer
MAX_HEAD = 16 << 10  # bytes of request line and headers (a scrape sends a few hundred)
WORKERS = 2  # threads rendering answers; complete requests beyond them wait their turn


class ListenFailed(Exception):
    "The metrics listener could not bind its address."


def cycle_values(conn: sqlite3.Connection, registry: Registry) -> dict:
    """The values that change only when a cycle ends or a version moves (the jobs and audit
    tables are small; each query uses an index or reads a few hundred rows).

    Returns:
        {jobs: {state: n}, cycle_seconds: {sum, count}, last_cycle: {state, duration_s,
        finished_at, tokens_per_s} | None, last_success: ts | None, promotions, rollbacks,
        scores: {active|candidate: {version, nll, epsilon}}}
    """
    from lorad.release.registry import RegistryError
    from lorad.training.jobdir import JobError, read_result

    q = conn.execute
    marks = ", ".join("?" for _ in FINAL_STATES)
    jobs = dict(q(f"SELECT state, count(*) FROM jobs WHERE state IN ({marks}) GROUP BY state", FINAL_STATES))
    total, count = q(
        f"SELECT sum(finished_at - started_at), count(*) FROM jobs WHERE state IN ({marks}) "
        "AND started_at IS NOT NULL AND finished_at IS NOT NULL",
        FINAL_STATES,
    ).fetchone()
    last = q(
        f"SELECT state, started_at, finished_at, job_dir FROM jobs WHERE state IN ({marks}) "
        "AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1",
        FINAL_STATES,
    ).fetchone()
    last_cycle = None
    if last is not None:
        state, started, finished, job_dir = last
        tokens_per_s = None
        if job_dir:
            try:
                result = read_result(job_dir)
            except JobError:
                result = None
            tokens_per_s = result.tokens_per_s if result is not None else None
        last_cycle = {
            "state": state,
            "duration_s": (finished or started) - started,
            "finished_at": finished,
            "tokens_per_s": tokens_per_s,
        }
    last_success = q("SELECT max(finished_at) FROM jobs WHERE state IN ('promoted', 'rejected')").fetchone()[0]
    moves = dict(
        q(
            "SELECT event, count(*) FROM audit WHERE event IN (?, ?) GROUP BY event",
            (events.ADAPTER_PROMOTED, events.ADAPTER_ROLLED_BACK),
        )
    )
    scores: dict = {}
    try:
        names = registry.names()
        for label, name in (("active", registry.current()), ("candidate", names[-1] if names else None)):
            if name is not None:
                own = (registry.get(name).record.get("metrics") or {}).get("candidate") or {}
                scores[label] = {"version": name, "nll": own.get("nll"), "epsilon": own.get("epsilon")}
    except (RegistryError, OSError):
        pass  # status reports the registry's problems; the scores wait for the next cycle
    return {
        "jobs": jobs,
        "cycle_seconds": {"sum": total or 0.0, "count": count},
        "last_cycle": last_cycle,
        "last_success": last_success,
        "promotions": moves.get(events.ADAPTER_PROMOTED, 0),
        "rollbacks": moves.get(events.ADAPTER_ROLLED_BACK, 0),
        "scores": scores,
    }


class Metrics:
    """The daemon's metrics as a prometheus-client collector.

    Args:
        status: returns the service's status snapshot (memory only; called on every scrape).
        sources: the configured source keys (their counters start at 0).
    """

    def __init__(self, status: Callable[[], dict], sources: list[str]):
        self.status = status
        self._lock = threading.Lock()
        self._ingested = dict.fromkeys(sources, 0)
        self._quarantined = dict.fromkeys(sources, 0)
        self._cycle: dict = {}
        self._server: Listener | None = None

    # -- fed by the daemon's threads ------------------------------------------------------------

    def count_ingest(self, report) -> None:
        """An IngestReport from the ingest thread: new artifacts and quarantined files, by source."""
        with self._lock:
            for source, counts in report.per_source.items():
                self._ingested[source] = self._ingested.get(source, 0) + counts.get("new", 0)
                self._quarantined[source] = self._quarantined.get(source, 0) + counts.get("quarantined", 0)

    def set_cycle_values(self, values: dict) -> None:
        """From :func:`cycle_values`, in the main loop."""
        with self._lock:
            self._cycle = values

    # -- serving --------------------------------------------------------------------------------

    def listen(
        self, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS, request_seconds: float = REQUEST_SECONDS
    ) -> None:
        """Serve /metrics from threads of its own (the main loop never waits on a scrape).

        Args:
            max_connections, request_seconds: see :class:`Listener`.

        Raises:
            ListenFailed: the address is taken or cannot be bound.
        """
        registry = CollectorRegistry()
        registry.register(self)
        registry.register(ProcessCollector(registry=None))
        self._server = Listener(
            exposition.make_wsgi_app(registry),
            host,
            port,
            max_connections=max_connections,
            request_seconds=request_seconds,
        )
        self._server.start()
        log.info(events.METRICS_LISTENING, address=f"{host}:{self._server.port}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def write_textfile(self, path: str) -> None:
        """Rewrite ``path`` atomically; a failure is logged, never raised (the cycle is done)."""
        registry = CollectorRegistry()
        registry.register(self)
        try:
            exposition.write_to_textfile(path, registry)
        except OSError as e:
            log.warning(events.METRICS_TEXTFILE_FAILED, path=path, error=str(e))

    # -- the collector protocol -----------------------------------------------------------------

    def describe(self):
        return []  # names are fixed; skip the registry's trial collect

    def collect(self):
        snap = self.status()
        with self._lock:
            ingested, quarantined, cyc = dict(self._ingested), dict(self._quarantined), dict(self._cycle)
        yield _labelled(
            families.CounterMetricFamily,
            "lorad_artifacts_ingested",
            "source",
            ingested,
            "New artifacts written to the buffer since the daemon started, by source",
        )
        yield _labelled(
            families.CounterMetricFamily,
            "lorad_artifacts_quarantined",
            "source",
            quarantined,
            "Files quarantined since the daemon started, by source",
        )

        b = snap.get("buffer") or {}
        yield _gauge("lorad_buffer_artifacts", "Artifacts in the buffer", b.get("artifacts", 0))
        yield _gauge("lorad_buffer_quarantined", "Files in quarantine", b.get("quarantined", 0))
        yield _labelled(
            families.GaugeMetricFamily,
            "lorad_buffer_examples",
            "split",
            {split: b.get(key, 0) for split, key in SPLITS},
            "Training examples in the buffer, by split",
        )
        yield _gauge(
            "lorad_buffer_untrained_examples",
            "Training examples no version was trained on yet (what the scheduler waits for)",
            b.get("untrained_examples", 0),
        )

        state = snap.get("state", "starting")
        yield families.StateSetMetricFamily(
            "lorad_scheduler_state",
            "What the daemon is doing",
            value={name: name == state for name in SCHEDULER_STATES},
        )
        yield _gauge(
            "lorad_scheduling_paused",
            "1 while scheduled training is paused (lorad pause)",
            1 if snap.get("scheduling_paused") else 0,
        )
        yield _gauge(
            "lorad_backoff_failures",
            "Failed jobs in a row (the scheduler backs off)",
            (snap.get("schedule") or {}).get("failures") or 0,
        )
        yield _gauge(
            "lorad_window_open",
            "1 while a training window is open",
            1 if (snap.get("next_window") or {}).get("open") else 0,
        )
        info = families.InfoMetricFamily(
            "lorad_active_version", "The adapter version serving now (none: the base model)", labels=["version"]
        )
        info.add_metric([snap.get("active_version") or "none"], {})
        yield info

        jobs = cyc.get("jobs") or {}
        yield _labelled(
            families.CounterMetricFamily,
            "lorad_jobs",
            "state",
            {name: jobs.get(name, 0) for name in FINAL_STATES},
            "Training jobs that ended, by final state",
        )
        cs = cyc.get("cycle_seconds") or {}
        yield families.SummaryMetricFamily(
            "lorad_cycle_duration_seconds",
            "Wall time of ended jobs (first start to final state)",
            count_value=cs.get("count", 0),
            sum_value=cs.get("sum", 0.0),
        )
        last = cyc.get("last_cycle") or {}
        yield _gauge(
            "lorad_last_cycle_duration_seconds", "Wall time of the job that ended last", last.get("duration_s")
        )
        yield _gauge(
            "lorad_last_training_tokens_per_second",
            "Training throughput of the job that ended last (its result.json)",
            last.get("tokens_per_s"),
        )
        yield _gauge(
            "lorad_last_success_timestamp_seconds",
            "When the last cycle with a verdict (promoted or rejected) ended",
            cyc.get("last_success"),
        )
        yield _labelled(
            families.CounterMetricFamily,
            "lorad_promotions",
            None,
            {"": cyc.get("promotions", 0)},
            "Adapter promotions (the audit table)",
        )
        yield _labelled(
            families.CounterMetricFamily,
            "lorad_rollbacks",
            None,
            {"": cyc.get("rollbacks", 0)},
            "Adapter rollbacks (the audit table)",
        )

        scores = cyc.get("scores") or {}
        nll = families.GaugeMetricFamily(
            "lorad_heldout_nll",
            "Held-out NLL of the active version and of the last candidate, each as scored when it was the candidate",
            labels=["adapter", "version"],
        )
        eps = families.GaugeMetricFamily(
            "lorad_heldout_epsilon",
            "First-attempt guard acceptance on the held-out "
            "set, scored like lorad_heldout_nll (only with evaluation.guard_command)",
            labels=["adapter", "version"],
        )
        for label in ADAPTERS:
            score = scores.get(label) or {}
            for family, key in ((nll, "nll"), (eps, "epsilon")):
                if isinstance(score.get(key), (int, float)) and score[key] == score[key]:  # not NaN
                    family.add_metric([label, score["version"]], score[key])
        yield nll
        yield eps
        yield _labelled(
            families.GaugeMetricFamily,
            "lorad_vllm_asleep",
            "url",
            {s["url"]: int(s["state"] != "awake") for s in snap.get("gpu_share") or []},
            "1 while a vLLM server that shares the GPU is asleep (or was not woken)",
        )


def _gauge(name: str, documentation: str, value):
    g = families.GaugeMetricFamily(name, documentation)
    if value is not None:
        g.add_metric([], value)
    return g


def _labelled(kind, name: str, label: str | None, values: dict, documentation: str):
    """A family of ``kind`` with one sample per key of ``values`` (label None: one unlabelled sample)."""
    family = kind(name, documentation, labels=[label] if label else None)
    for key, value in sorted(values.items()):
        family.add_metric([key] if label else [], value)
    return family


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    fd: int
    deadline: float  # monotonic: the request head must have arrived by then
    buf: bytearray = field(default_factory=bytearray)
    closed: bool = False


class Listener:
    """A small HTTP server for one WSGI app, bounded in connections, threads and time.

    One request per connection (the answer says ``Connection: close``); no request body is
    read. What a client cannot get around:

    - ``request_seconds`` from accept to the blank line that ends the request head, however
      the bytes trickle in, and as long again to take the answer; then the connection is closed;
    - ``max_connections`` open at once: one more closes the connection that has waited longest
      for its request (or, when every one is being answered, is itself closed at once), and so
      does running out of file descriptors;
    - ``WORKERS`` threads render and send answers, so a flood of complete requests queues
      instead of starting a thread each.

    Args:
        app: the WSGI application (prometheus-client's ``make_wsgi_app``).
        host, port: the address to bind (port 0: any free one, see ``port``).

    Raises:
        ListenFailed: the address cannot be bound.
    """

    def __init__(
        self,
        app: Callable,
        host: str,
        port: int,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_seconds: float = REQUEST_SECONDS,
        workers: int = WORKERS,
    ):
        self.app = app
        self.max_connections = max_connections
        self.request_seconds = request_seconds
        self._n_workers = workers
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
                0
            ]
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
                sock.listen(socket.SOMAXCONN)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            raise ListenFailed(
                f"metrics.listen: cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}"
            ) from None
        sock.setblocking(False)
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._reading: OrderedDict[int, _Conn] = OrderedDict()  # fd -> conn, in deadline order
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = 0  # connections open: reading, queued, being answered (workers close them too)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for _ in range(self._n_workers):
            self._threads.append(threading.Thread(target=self._work, name="lorad-metrics-worker", daemon=True))
        self._threads.append(threading.Thread(target=self._loop, name="lorad-metrics", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop accepting, close what is still being read, let the workers finish their answer."""
        self._stopping.set()
        for _ in range(self._n_workers):
            self._requests.put(None)
        for t in self._threads:
            t.join()
        self._sock.close()

    # -- the selector thread ------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(self._wait_time()):
                    if key.data is not None and key.data.closed:
                        continue  # closed by an earlier event of this round
                    try:
                        if key.data is None:
                            self._accept()
                        else:
                            self._readable(key.data)
                    except Exception:  # this thread must outlive any one connection
                        log.exception(events.METRICS_SCRAPE_FAILED)
                        if key.data is not None and key.data.fd in self._reading:
                            self._close(key.data)
                now = time.monotonic()
                while self._reading and next(iter(self._reading.values())).deadline <= now:
                    self._close(next(iter(self._reading.values())))
        finally:
            for conn in list(self._reading.values()):
                self._close(conn)
            self._selector.close()

    def _wait_time(self) -> float:
        wait = 0.2  # how soon a stop() is noticed
        if self._reading:
            wait = min(wait, next(iter(self._reading.values())).deadline - time.monotonic())
        return max(0.0, wait)

    def _accept(self) -> None:
        for _ in range(64):  # then read what is waiting, and come back
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and self._reading:
                    self._close(next(iter(self._reading.values())))  # a descriptor for the next one
                elif e.errno not in (errno.ECONNABORTED, errno.EINTR):
                    time.sleep(0.05)  # nothing to give back: let the workers finish some
                return
            with self._lock:
                full = self._open >= self.max_connections
            if full and self._reading:
                self._close(next(iter(self._reading.values())))  # the one that waited longest
            elif full:
                sock.close()  # every connection is being answered: this one tries again later
                continue
            with self._lock:
                self._open += 1
            sock.setblocking(False)
            conn = _Conn(sock, sock.fileno(), time.monotonic() + self.request_seconds)
            self._reading[conn.fd] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)  # gone before its request was whole
            return
        conn.buf += data
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0 and len(conn.buf) <= MAX_HEAD:
            return
        self._selector.unregister(conn.fd)
        del self._reading[conn.fd]
        self._requests.put((conn, bytes(conn.buf[:end]) if 0 <= end <= MAX_HEAD else None))

    def _close(self, conn: _Conn) -> None:
        """Close a connection still being read (selector thread only)."""
        del self._reading[conn.fd]
        self._selector.unregister(conn.fd)
        self._release(conn)

    def _release(self, conn: _Conn) -> None:
        conn.closed = True
        conn.sock.close()
        with self._lock:
            self._open -= 1

    # -- the workers ----------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._requests.get()) is not None:
            conn, head = item
            try:
                answer = self._answer(head)
                conn.sock.settimeout(self.request_seconds)  # a scraper that never reads is dropped
                conn.sock.sendall(answer)
            except OSError:
                pass  # the scraper went away, or did not take its answer in time
            except Exception:  # an answer that failed to render must not end this worker
                log.exception(events.METRICS_SCRAPE_FAILED)
            finally:
                self._release(conn)

    def _answer(self, head: bytes | None) -> bytes:
        """The whole HTTP response to a request head (None: one over ``MAX_HEAD`` bytes)."""
        environ = _environ(head) if head is not None else None
        if environ is None:
            status, headers, body = (
                ("431 Request Header Fields Too Large" if head is None else "400 Bad Request"),
                [],
                b"",
            )
        else:
            reply: list = []
            body = b"".join(self.app(environ, lambda status, headers, exc_info=None: reply.extend((status, headers))))
            status, headers = reply
        lines = [
            f"HTTP/1.1 {status}",
            *(f"{k}: {v}" for k, v in headers),
            f"Content-Length: {len(body)}",
            "Connection: close",
            "",
            "",
        ]
        return "\r\n".join(lines).encode("latin-1") + body


def _environ(head: bytes) -> dict | None:
    """The WSGI environ prometheus-client's app reads, from a request head; None if malformed."""
    try:
        request, *fields = head.decode("latin-1").split("\r\n")
        method, target, version = request.split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/"):
        return None
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "PATH_INFO": unquote(path), "QUERY_STRING": query}
    for line in fields:
        name, sep, value = line.partition(":")
        if sep:
            environ["HTTP_" + name.strip().upper().replace("-", "_")] = value.strip()
    return environ
