"""Sharing one GPU with a vLLM server: asleep while the worker trains, awake again after.

A ``[[publish]] kind = "vllm"`` table with ``sleep_during_training = true`` names a server
started with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``. Before the worker starts,
:meth:`GpuShare.asleep` sends ``POST /sleep?level=1`` (weights to CPU memory, KV cache
dropped) and checks ``GET /is_sleeping``; after the worker exits, however it exits, it sends
``POST /wake_up`` and checks again. The conclusion (and the publish hook that loads the new
adapter) runs after the wake.

"Asleep" is recorded durably before the sleep request goes out (the buffer's
``daemon_state``, key ``gpu_share:<url>``, through :class:`lorad.buffer.job_table.JobStore`) and
removed only once the server says it is awake, so a process that dies in between (a killed
daemon, a killed ``lorad train``) leaves a record the next one acts on:
:meth:`GpuShare.wake_recorded` at the start of every cycle and the daemon's waker thread
(:mod:`lorad.daemon.waker`) at start and every ``RETRY_EVERY`` seconds. A wake that fails after
its retries is logged (``server_wake_failed``), audited and kept as ``wake_failed`` in the
record, which ``lorad status`` shows. Torch-free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import structlog

from lorad import events
from lorad.config import PublishSettings as _Defaults
from lorad.release import http_client

log = structlog.get_logger()

SLEEP_LEVEL = 1  # weights kept in CPU memory: the wake is fast and needs no reload
STATE_PREFIX = "gpu_share:"
DETAIL_CHARS = 500


class ShareError(Exception):
    "A server could not be put to sleep (or woken); the message names it and says why."


@dataclass(frozen=True)
class SleepingServer:
    """vLLM's sleep-mode endpoints on one server, each request retried like the publish hook's.

    Args:
        url: the server's base URL.
        api_key_env: environment variable holding a bearer token ("" = none).
        timeout: seconds per request.
        retries: further attempts after a connection error, a 5xx or a wrong state.
        backoff: seconds before the first retry, doubling after each.
    """

    url: str
    api_key_env: str = _Defaults.api_key_env
    timeout: float = _Defaults.timeout
    retries: int = _Defaults.retries
    backoff: float = _Defaults.backoff
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)

    def params(self) -> dict:
        """What the durable record keeps, so a later process can wake the server without the config."""
        return {k: v for k, v in asdict(self).items() if k != "sleep"}

    def put_to_sleep(self) -> None:
        """``POST /sleep?level=1`` until ``GET /is_sleeping`` says true.

        Raises:
            ShareError: the server did not go to sleep after every attempt.
        """
        self._until(True, "POST", f"/sleep?level={SLEEP_LEVEL}")

    def wake(self) -> None:
        """``POST /wake_up`` until ``GET /is_sleeping`` says false. A server without the
        sleep endpoints (404: no VLLM_SERVER_DEV_MODE) cannot be asleep, so it counts as awake.

        Raises:
            ShareError: the server is not awake after every attempt.
        """
        try:
            self._until(False, "POST", "/wake_up")
        except _NoSleepMode:
            return

    def is_sleeping(self) -> bool:
        """One ``GET /is_sleeping``.

        Raises:
            ShareError: no answer, or an answer without a boolean ``is_sleeping``.
        """
        text = self._request("GET", "/is_sleeping")
        try:
            reply = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser
            reply = None
        value = reply.get("is_sleeping") if isinstance(reply, dict) else None
        if not isinstance(value, bool):
            raise ShareError(f'GET /is_sleeping answered {text[:DETAIL_CHARS]!r}, not {{"is_sleeping": bool}}')
        return value

    def _until(self, sleeping: bool, method: str, path: str) -> None:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self._request(method, path)
                if self.is_sleeping() == sleeping:
                    return
                last = f"{method} {path} answered, but GET /is_sleeping still says {not sleeping}"
            except _NoSleepMode as e:
                if not sleeping:
                    raise
                raise ShareError(
                    f"vllm {self.url}: {e} (is the server started with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1?)"
                ) from None
            except _Final as e:
                raise ShareError(f"vllm {self.url}: {e}") from None
            except ShareError as e:
                last = str(e)
        raise ShareError(f"vllm {self.url}: {last} (after {self.retries + 1} attempts)")

    def _request(self, method: str, path: str) -> str:
        try:
            return http_client.send(
                self.url,
                method,
                path,
                b"" if method == "POST" else None,
                headers=http_client.bearer(self.api_key_env),
                timeout=self.timeout,
            )
        except http_client.HttpError as e:
            text = f"{method} {path}: HTTP {e.status}: {e.text[:DETAIL_CHARS]}" if e.status else str(e)
            if e.status == 404:  # no sleep endpoints: not started with VLLM_SERVER_DEV_MODE=1
                raise _NoSleepMode(text) from None
            if e.final:
                raise _Final(text) from None
            raise ShareError(text) from None


class _Final(Exception):
    "A 4xx: asking again gets the same answer."


class _NoSleepMode(_Final):
    "404 from a sleep endpoint: the server has none."


def servers_from_settings(tables) -> list[SleepingServer]:
    """The servers of the ``[[publish]]`` tables (PublishSettings) that sleep during training."""
    return [
        SleepingServer(t.url, t.api_key_env, t.timeout, t.retries, t.backoff)
        for t in tables
        if t.kind == "vllm" and t.sleep_during_training
    ]


class GpuShare:
    """The servers that make room for the worker, and the durable record of which are asleep.

    Args:
        servers: from :func:`servers_from_settings` (none: every method does nothing).
        store: a :class:`lorad.buffer.job_table.JobStore` (its ``daemon_state`` holds the record).
        audit: ``audit(event, job_id=..., **detail)`` for failed wakes (``Buffer.record_event``).
    """

    def __init__(self, servers: list[SleepingServer], store, audit: Callable[..., None] | None = None):
        self.servers, self.store, self.audit = servers, store, audit

    @contextmanager
    def asleep(self, job_id: str) -> Iterator[None]:
        """Every server asleep for the body, awake again after it, whatever way it ends.

        Raises:
            ShareError: a server would not sleep (those already asleep are woken first); the
                worker must not start then, or it would run out of memory beside the server.
        """
        done: list[SleepingServer] = []
        try:
            for server in self.servers:
                self._record(server, "asleep", job_id)  # first: a crash right after still wakes it
                done.append(server)
                server.put_to_sleep()
                log.info(events.SERVER_SLEPT, url=server.url, job_id=job_id)
        except Exception as e:  # noqa: BLE001 - whatever stopped the sleep, wake those asleep first
            error = e if isinstance(e, ShareError) else ShareError(f"vllm {server.url}: {type(e).__name__}: {e}")
            log.error(events.SERVER_SLEEP_FAILED, url=server.url, job_id=job_id, error=str(error))
            self._wake(done, job_id)
            raise error from None
        try:
            yield
        finally:
            self._wake(done, job_id)

    def recorded(self) -> list[dict]:
        """The servers recorded asleep (or not woken), as their records."""
        return records(self.store)

    def wake_recorded(self) -> list[str]:
        """Wake every server a record says is asleep (left so by a process that died, or a wake
        that failed). Returns the URLs still not awake."""
        failed = []
        for r in self.recorded():
            try:
                server = SleepingServer(**r["server"])
            except (KeyError, TypeError) as e:  # a record this version cannot read: say so, go on
                log.error(
                    events.SERVER_WAKE_FAILED,
                    url=r.get("url"),
                    job_id=r.get("job_id"),
                    error=f"unreadable record: {type(e).__name__}: {e}",
                )
                failed.append(str(r.get("url")))
                continue
            failed += self._wake([server], r.get("job_id"))
        return failed

    def _wake(self, servers: list[SleepingServer], job_id: str | None) -> list[str]:
        """Wake each server; returns the URLs not woken. Never raises.

        Why never: it runs after the worker, however the worker ended; an exception here (a
        reply no parser expected, a record that could not be written) failed a job whose
        adapter was trained, and killed the waker thread. A failure is recorded as
        ``wake_failed`` (or, when even that cannot be written, the ``asleep`` record written
        before the sleep stays), so the waker retries it.
        """
        failed = []
        for server in servers:
            try:
                server.wake()
            except Exception as e:  # noqa: BLE001 - see above: whatever it was, the server is not awake
                failed.append(server.url)
                error = str(e) if isinstance(e, ShareError) else f"vllm {server.url}: {type(e).__name__}: {e}"
                self._wake_failed(server, job_id, error)
                continue
            kept = {}
            try:
                self.store.delete_state(STATE_PREFIX + server.url)
            except Exception as e:  # noqa: BLE001 - the record stays; the waker's next wake finds it awake
                kept = {"record_kept": f"{type(e).__name__}: {e}"}
            log.info(events.SERVER_WOKEN, url=server.url, job_id=job_id, **kept)
        return failed

    def _wake_failed(self, server: SleepingServer, job_id: str | None, error: str) -> None:
        attempts = 1
        try:
            previous = self.store.get_state(STATE_PREFIX + server.url) or {}
            attempts = int(previous.get("wake_attempts", 0)) + 1
            self._record(server, "wake_failed", job_id, error=error[:DETAIL_CHARS], wake_attempts=attempts)
        except Exception as e:  # noqa: BLE001 - the "asleep" record written before the sleep stays
            error += f" (and recording it failed: {type(e).__name__}: {e})"
        log.error(events.SERVER_WAKE_FAILED, url=server.url, job_id=job_id, error=error, attempts=attempts)
        if self.audit is not None:
            try:
                self.audit(events.SERVER_WAKE_FAILED, job_id=job_id, url=server.url, error=error, attempts=attempts)
            except Exception:  # noqa: BLE001, S110 - the log line above says it all; the audit is its copy
                pass

    def _record(self, server: SleepingServer, state: str, job_id: str | None, **detail) -> None:
        self.store.set_state(
            STATE_PREFIX + server.url,
            {
                "url": server.url,
                "state": state,
                "since": time.time(),
                "job_id": job_id,
                "server": server.params(),
                **detail,
            },
        )


def records(store) -> list[dict]:
    """Every ``gpu_share:`` record in ``store``'s daemon_state, oldest first."""
    return sorted(store.states(STATE_PREFIX).values(), key=lambda r: r.get("since", 0))


def server_states(tables, recorded: list[dict]) -> list[dict]:
    """What status shows for each server that sleeps during training (configured or recorded):
    its record's state (asleep, wake_failed), else awake.

    Args:
        tables: the ``[[publish]]`` tables; recorded: :func:`records`.
    """
    by_url = {r["url"]: r for r in recorded}
    out: list[dict] = []
    for url in [t.url for t in tables if t.kind == "vllm" and t.sleep_during_training] + list(by_url):
        if any(o["url"] == url for o in out):
            continue
        r = by_url.get(url)
        out.append(
            {
                "url": url,
                "state": r["state"] if r else "awake",
                "since": r.get("since") if r else None,
                "job_id": r.get("job_id") if r else None,
                "error": r.get("error") if r else None,
            }
        )
    return out
