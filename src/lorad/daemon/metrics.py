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
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, exposition
from prometheus_client import core as families

from lorad import events

log = structlog.get_logger()

SCHEDULER_STATES = ("starting", "idle", "paused", "preparing", "training", "evaluating")
FINAL_STATES = ("promoted", "rejected", "failed", "cancelled", "skipped")
ADAPTERS = ("active", "candidate")
SPLITS = (("all", "examples"), ("train", "train"), ("heldout", "heldout"), ("duplicates", "duplicates"))


class ListenFailed(Exception):
    "The metrics listener could not bind its address."


def cycle_values(conn: sqlite3.Connection, state_dir: Path) -> dict:
    """The values that change only when a cycle ends or a version moves (the jobs and audit
    tables are small; each query uses an index or reads a few hundred rows).

    Returns:
        {jobs: {state: n}, cycle_seconds: {sum, count}, last_cycle: {state, duration_s,
        finished_at, tokens_per_s} | None, last_success: ts | None, promotions, rollbacks,
        scores: {active|candidate: {version, nll, epsilon}}}
    """
    from lorad.registry import Registry, RegistryError
    from lorad.training.job import JobError, read_result

    q = conn.execute
    marks = ", ".join("?" for _ in FINAL_STATES)
    jobs = dict(q(f"SELECT state, count(*) FROM jobs WHERE state IN ({marks}) GROUP BY state", FINAL_STATES))
    total, count = q(f"SELECT sum(finished_at - started_at), count(*) FROM jobs WHERE state IN ({marks}) "
                     "AND started_at IS NOT NULL AND finished_at IS NOT NULL", FINAL_STATES).fetchone()
    last = q(f"SELECT state, started_at, finished_at, job_dir FROM jobs WHERE state IN ({marks}) "
             "AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1", FINAL_STATES).fetchone()
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
        last_cycle = {"state": state, "duration_s": (finished or started) - started, "finished_at": finished,
                      "tokens_per_s": tokens_per_s}
    last_success = q("SELECT max(finished_at) FROM jobs WHERE state IN ('promoted', 'rejected')").fetchone()[0]
    moves = dict(q("SELECT event, count(*) FROM audit WHERE event IN (?, ?) GROUP BY event",
                   (events.ADAPTER_PROMOTED, events.ADAPTER_ROLLED_BACK)))
    registry = Registry(Path(state_dir) / "adapters")
    scores: dict = {}
    try:
        names = registry.names()
        for label, name in (("active", registry.current()), ("candidate", names[-1] if names else None)):
            if name is not None:
                own = (registry.get(name).record.get("metrics") or {}).get("candidate") or {}
                scores[label] = {"version": name, "nll": own.get("nll"), "epsilon": own.get("epsilon")}
    except (RegistryError, OSError):
        pass  # status reports the registry's problems; the scores wait for the next cycle
    return {"jobs": jobs, "cycle_seconds": {"sum": total or 0.0, "count": count},
            "last_cycle": last_cycle, "last_success": last_success,
            "promotions": moves.get(events.ADAPTER_PROMOTED, 0), "rollbacks": moves.get(events.ADAPTER_ROLLED_BACK, 0),
            "scores": scores}


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
        self._server = None
        self._thread: threading.Thread | None = None

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

    def listen(self, host: str, port: int) -> None:
        """Serve /metrics from threads of its own (the main loop never waits on a scrape).

        Raises:
            ListenFailed: the address is taken or cannot be bound.
        """
        registry = CollectorRegistry()
        registry.register(self)
        registry.register(ProcessCollector(registry=None))
        try:
            self._server, self._thread = exposition.start_http_server(port, host, registry=registry)
        except OSError as e:
            raise ListenFailed(f"metrics.listen: cannot listen on {host}:{port}: {e.strerror or e}") from None
        log.info(events.METRICS_LISTENING, address=f"{host}:{self._server.server_port}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
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
        yield _labelled(families.CounterMetricFamily, "lorad_artifacts_ingested", "source", ingested,
                        "New artifacts written to the buffer since the daemon started, by source")
        yield _labelled(families.CounterMetricFamily, "lorad_artifacts_quarantined", "source", quarantined,
                        "Files quarantined since the daemon started, by source")

        b = snap.get("buffer") or {}
        yield _gauge("lorad_buffer_artifacts", "Artifacts in the buffer", b.get("artifacts", 0))
        yield _gauge("lorad_buffer_quarantined", "Files in quarantine", b.get("quarantined", 0))
        yield _labelled(families.GaugeMetricFamily, "lorad_buffer_examples", "split",
                        {split: b.get(key, 0) for split, key in SPLITS},
                        "Training examples in the buffer, by split")
        yield _gauge("lorad_buffer_untrained_examples", "Training examples no version was trained on yet "
                     "(what the scheduler waits for)", b.get("untrained_examples", 0))

        state = snap.get("state", "starting")
        yield families.StateSetMetricFamily("lorad_scheduler_state", "What the daemon is doing",
                                            value={name: name == state for name in SCHEDULER_STATES})
        yield _gauge("lorad_scheduling_paused", "1 while scheduled training is paused (lorad pause)",
                     1 if snap.get("scheduling_paused") else 0)
        yield _gauge("lorad_backoff_failures", "Failed jobs in a row (the scheduler backs off)",
                     (snap.get("schedule") or {}).get("failures") or 0)
        yield _gauge("lorad_window_open", "1 while a training window is open",
                     1 if (snap.get("next_window") or {}).get("open") else 0)
        info = families.InfoMetricFamily("lorad_active_version", "The adapter version serving now (none: the base "
                                         "model)", labels=["version"])
        info.add_metric([snap.get("active_version") or "none"], {})
        yield info

        jobs = cyc.get("jobs") or {}
        yield _labelled(families.CounterMetricFamily, "lorad_jobs", "state",
                        {name: jobs.get(name, 0) for name in FINAL_STATES}, "Training jobs that ended, by final state")
        cs = cyc.get("cycle_seconds") or {}
        yield families.SummaryMetricFamily("lorad_cycle_duration_seconds", "Wall time of ended jobs (first start "
                                           "to final state)", count_value=cs.get("count", 0),
                                           sum_value=cs.get("sum", 0.0))
        last = cyc.get("last_cycle") or {}
        yield _gauge("lorad_last_cycle_duration_seconds", "Wall time of the job that ended last",
                     last.get("duration_s"))
        yield _gauge("lorad_last_training_tokens_per_second", "Training throughput of the job that ended last "
                     "(its result.json)", last.get("tokens_per_s"))
        yield _gauge("lorad_last_success_timestamp_seconds", "When the last cycle with a verdict (promoted or "
                     "rejected) ended", cyc.get("last_success"))
        yield _labelled(families.CounterMetricFamily, "lorad_promotions", None, {"": cyc.get("promotions", 0)},
                        "Adapter promotions (the audit table)")
        yield _labelled(families.CounterMetricFamily, "lorad_rollbacks", None, {"": cyc.get("rollbacks", 0)},
                        "Adapter rollbacks (the audit table)")

        scores = cyc.get("scores") or {}
        nll = families.GaugeMetricFamily("lorad_heldout_nll", "Held-out NLL of the active version and of the last "
                                         "candidate, each as scored when it was the candidate",
                                         labels=["adapter", "version"])
        eps = families.GaugeMetricFamily("lorad_heldout_epsilon", "First-attempt guard acceptance on the held-out "
                                         "set, scored like lorad_heldout_nll (only with evaluation.guard_command)",
                                         labels=["adapter", "version"])
        for label in ADAPTERS:
            score = scores.get(label) or {}
            for family, key in ((nll, "nll"), (eps, "epsilon")):
                if isinstance(score.get(key), (int, float)) and score[key] == score[key]:  # not NaN
                    family.add_metric([label, score["version"]], score[key])
        yield nll
        yield eps
        yield _labelled(families.GaugeMetricFamily, "lorad_vllm_asleep", "url",
                        {s["url"]: int(s["state"] != "awake") for s in snap.get("gpu_share") or []},
                        "1 while a vLLM server that shares the GPU is asleep (or was not woken)")


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
