"""Thin clients of the daemon: each sends one request over the control socket and prints the answer.

`lorad status`, `jobs`, `train-now`, `cancel`, `pause`, `resume`, `reload`, `feedback`. With no
daemon listening they say so and exit 69 (EX_UNAVAILABLE); a daemon that does not answer within
``--timeout`` seconds exits 75 (EX_TEMPFAIL), saying that a request it was sent may still be
applied; a socket path too long for a Unix socket exits 78 (EX_CONFIG); an error from the
daemon exits 1, except a feedback record that conflicts with the one stored under its id,
which exits 65 (EX_DATAERR), and one the daemon queued but could not commit in time
(``"pending": true``), which exits 75 like a timeout: it may still be applied.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.commands import emit
from lorad.commands.render import JobProgress, duration, progress_line

if TYPE_CHECKING:
    from lorad.config import Settings

EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
DEFAULT_TIMEOUT = 30.0


def register(sub, common) -> None:
    import argparse

    timeout = argparse.ArgumentParser(add_help=False)
    timeout.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the daemon's answer (default {DEFAULT_TIMEOUT:g}); past it the command exits 75",
    )
    p = sub.add_parser(
        "status", parents=[common, timeout], help="the daemon's state, buffer counts, current job and next window"
    )
    p.set_defaults(func=status)

    p = sub.add_parser("jobs", parents=[common, timeout], help="recent training jobs (or one job's details)")
    p.add_argument("job_id", nargs="?", metavar="JOB", help="show this job with its state changes")
    p.add_argument("--limit", type=_positive, default=20, help="how many jobs (default 20)")
    p.set_defaults(func=jobs)

    p = sub.add_parser("train-now", parents=[common, timeout], help="queue a training job now, ignoring the window")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job until it ends; exit 0 if promoted, rejected or skipped (nothing to "
        "train on), 1 if it failed, was cancelled or paused",
    )
    p.set_defaults(func=train_now)

    p = sub.add_parser(
        "cancel", parents=[common, timeout], help="stop a job cleanly (a running worker stops at its next step)"
    )
    p.add_argument("job_id", metavar="JOB")
    p.set_defaults(func=cancel)

    p = sub.add_parser(
        "pause", parents=[common, timeout], help="pause scheduled training (a running window job checkpoints)"
    )
    p.set_defaults(func=lambda a, s: simple(a, s, "pause"))
    p = sub.add_parser("resume", parents=[common, timeout], help="resume scheduled training")
    p.set_defaults(func=lambda a, s: simple(a, s, "resume"))
    p = sub.add_parser(
        "reload",
        parents=[common, timeout],
        help="re-read the config (as SIGHUP does); an invalid one is refused and the old one kept",
    )
    p.set_defaults(func=lambda a, s: simple(a, s, "reload"))

    p = sub.add_parser(
        "feedback",
        parents=[common, timeout],
        help="push one attempt and its verdict into the buffer (for systems without a store)",
    )
    p.add_argument(
        "record",
        nargs="?",
        metavar="JSON",
        help="the record as a JSON object, or - to read it from stdin; the options below override its fields",
    )
    p.add_argument("--id")
    p.add_argument("--prompt")
    p.add_argument("--completion")
    p.add_argument("--status", choices=("accepted", "rejected"))
    p.add_argument("--score", type=float)
    p.add_argument("--feedback", dest="feedback_text", metavar="TEXT", help="the guard's feedback")
    p.add_argument("--parent-id")
    p.add_argument("--source", dest="origin", choices=("generated", "human", "imported"))
    p.add_argument("--created-at")
    p.add_argument(
        "--update",
        action="store_true",
        help="replace the record stored under this id if it differs (without it, a different "
        "record under a known id is refused and the command exits 65)",
    )
    p.set_defaults(func=feedback)


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


SYSTEMD_SOCKET = Path("/run/lorad/lorad.sock")


def socket_path(settings: Settings) -> Path:
    """Where the daemon listens, seen from a client.

    ``daemon.socket`` when set. Otherwise the daemon used $RUNTIME_DIRECTORY, which clients do
    not have: the systemd unit's /run/lorad/lorad.sock when it exists, else <state_dir>/lorad.sock.
    """
    path = settings.daemon.socket_path
    if settings.daemon.socket or os.environ.get("RUNTIME_DIRECTORY") or path.exists():
        return path
    return SYSTEMD_SOCKET if SYSTEMD_SOCKET.exists() else path


def call(settings: Settings, command: str, *, timeout: float = DEFAULT_TIMEOUT, **arguments) -> dict:
    """One request; daemon errors, absence and silence become CommandError (exit 1, 69, 75)."""
    from lorad.commands import CommandError
    from lorad.config import EX_CONFIG
    from lorad.daemon.preflight import socket_key
    from lorad.daemon.protocol import DaemonTimeout, DaemonUnavailable, ProtocolError, SocketPathTooLong, request

    try:
        response = request(socket_path(settings), command, timeout=timeout, **arguments)
    except DaemonUnavailable as e:
        raise CommandError(str(e), EX_UNAVAILABLE) from None
    except DaemonTimeout as e:
        raise CommandError(f"{command}: {e}", EX_TEMPFAIL) from None
    except SocketPathTooLong as e:
        raise CommandError(f"config error: {socket_key(settings)}: {e}", EX_CONFIG) from None
    except ProtocolError as e:
        raise CommandError(str(e)) from None
    if not response.get("ok"):
        code = EX_DATAERR if response.get("conflict") is True else EX_TEMPFAIL if response.get("pending") is True else 1
        raise CommandError(response.get("error") or "the daemon refused the request", code)
    return response


# -- formatting ---------------------------------------------------------------------------------


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def status_text(r: dict) -> str:
    lines = [f"lorad: {r['state']} (pid {r['pid']}, up {duration(r.get('uptime_s'))})"]
    lines.append(f"active version: {r.get('active_version') or 'none (base model)'}")
    lines += [
        f"registry: WARNING {p} (refused; lorad promote VERSION repairs it)" for p in r.get("registry_problems") or []
    ]
    b = r.get("buffer") or {}
    lines.append(
        f"buffer: {b.get('artifacts', 0)} artifacts in {b.get('chains', 0)} chains, "
        f"{b.get('examples', 0)} examples, {b.get('quarantined', 0)} quarantined"
    )
    # Two counts that differ after a rejected candidate: the scheduler waits for the second.
    lines.append(
        f"examples: {b.get('new_examples', 0)} added since the active version was trained; "
        f"{b.get('untrained_examples', 0)} not yet trained on by any version (promoted or rejected)"
    )
    if r.get("job"):
        lines.append(progress_line(r["job"]))
    else:
        lines.append("job: none running")
    w = r.get("next_window")
    if w:
        start, end = _when(w["start"]), _when(w["end"])
        now = datetime.now(timezone.utc)
        if w.get("open") or start <= now:
            lines.append(f"window: open until {end:%Y-%m-%d %H:%M %Z} ({duration((end - now).total_seconds())} left)")
        else:
            lines.append(
                f"next window: {start:%Y-%m-%d %H:%M}-{end:%H:%M %Z} "
                f"(opens in {duration((start - now).total_seconds())})"
            )
    else:
        lines.append("next window: none configured")
    running = (r.get("job") or {}).get("job_id")
    for server in r.get("gpu_share") or []:
        lines.append(_server_line(server, running))
    sched = r.get("schedule") or {}
    if r.get("scheduling_paused"):
        lines.append("scheduled training: paused (lorad resume)")
    if sched.get("decision"):
        lines.append(f"scheduler: {sched['decision']}")
    return "\n".join(lines)


def _server_line(server: dict, running: str | None) -> str:
    """A vLLM server that sleeps during training: awake, asleep while the running job trains, or
    (loud) not woken: its wake failed, or the job that put it to sleep is not running."""
    since = (
        f" since {datetime.fromtimestamp(server['since'], timezone.utc):%Y-%m-%d %H:%M:%S %Z}"
        if server.get("since")
        else ""
    )
    if server["state"] == "wake_failed":
        return (
            f"vllm {server['url']}: WARNING still asleep{since}, the wake failed ({server.get('error')}); "
            f"retried every 30 s"
        )
    if server["state"] == "asleep" and server.get("job_id") == running:
        return f"vllm {server['url']}: asleep while job {server.get('job_id')} trains{since}"
    if server["state"] == "asleep":
        return (
            f"vllm {server['url']}: WARNING still asleep{since}; job {server.get('job_id')} is not running "
            f"(the daemon wakes it within 30 s)"
        )
    return f"vllm {server['url']}: awake"


def _job_row(j: dict) -> str:
    created = datetime.fromtimestamp(j["created_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    extra = j.get("version") or ""
    reason = (j.get("reason") or "").replace("\n", " ")
    return f"{j['job_id']}  {j['state']:<10} {j['trigger']:<7} {created}  {extra}  {reason[:80]}".rstrip()


# -- handlers -----------------------------------------------------------------------------------


def status(args, settings: Settings) -> int:
    r = call(settings, "status", timeout=args.timeout)
    emit(args, r, status_text(r))
    return 0


def _jobs_call(settings: Settings, command: str, **arguments) -> dict:
    """The daemon's answer, or with no daemon running the same read from the buffer itself
    (`lorad train` records its jobs there too)."""
    from lorad.commands import CommandError

    try:
        return call(settings, command, **arguments)
    except CommandError as e:
        if e.code != EX_UNAVAILABLE or not settings.buffer_path.exists():
            raise
    from lorad.buffer.job_table import JobNotFound, JobStore
    from lorad.buffer.store import Buffer, BufferError

    try:
        with Buffer(settings.buffer_path, readonly=True) as buffer:
            store = JobStore(buffer.conn)
            if command == "jobs":
                return {"ok": True, "jobs": store.list(arguments["limit"])}
            job = store.get(arguments["job_id"])
            return {"ok": True, "job": job | {"events": store.events(job["job_id"])}}
    except (BufferError, JobNotFound) as e:
        raise CommandError(str(e)) from None


def jobs(args, settings: Settings) -> int:
    if args.job_id:
        r = _jobs_call(settings, "job", job_id=args.job_id, timeout=args.timeout)
        j = r["job"]
        lines = [_job_row(j)]
        if j.get("state") in ("preparing", "training", "evaluating"):
            lines.append(progress_line(j))
        for e in j.get("events", []):
            ts = datetime.fromtimestamp(e["ts"], timezone.utc).strftime("%H:%M:%S")
            lines.append(f"  {ts} {e['state']}" + (f": {e['reason']}" if e.get("reason") else ""))
        emit(args, r, "\n".join(lines))
        return 0
    r = _jobs_call(settings, "jobs", limit=args.limit, timeout=args.timeout)
    emit(args, r, "\n".join(_job_row(j) for j in r["jobs"]) or "no jobs yet")
    return 0


def train_now(args, settings: Settings) -> int:
    r = call(settings, "train_now", timeout=args.timeout)
    job_id = r["job"]["job_id"]
    if not args.wait:
        emit(args, r, f"queued {job_id}")
        return 0
    if not args.json:
        print(f"queued {job_id}", flush=True)
    from lorad.buffer.job_table import FINAL

    view = JobProgress(sys.stdout, enabled=not args.json)
    while True:
        job = call(settings, "job", job_id=job_id, timeout=args.timeout)["job"]
        if job["state"] in FINAL or job["state"] == "paused":
            break
        view.update(job)
        time.sleep(0.5)
    view.close()
    state = "skipped, nothing to train on" if job["state"] == "skipped" else job["state"]
    text = (
        f"job {job_id}: {state}"
        + (f" {job['version']}" if job.get("version") else "")
        + (f" ({job['reason']})" if job.get("reason") else "")
    )
    emit(args, {"ok": True, "job": job}, text)
    # skipped is no failure: nothing new was there to train on (`lorad train` exits 0 too)
    return 0 if job["state"] in ("promoted", "rejected", "skipped") else 1


def cancel(args, settings: Settings) -> int:
    r = call(settings, "cancel", job_id=args.job_id, timeout=args.timeout)
    emit(args, r, f"job {r['job_id']}: {r['state']}")
    return 0


def simple(args, settings: Settings, command: str) -> int:
    r = call(settings, command, timeout=args.timeout)
    texts = {
        "pause": "scheduled training paused",
        "resume": "scheduled training resumed",
        "reload": f"config reloaded from {r.get('reloaded')}"
        + (f"; restart needed for {', '.join(r['restart_needed'])}" if r.get("restart_needed") else ""),
    }
    emit(args, r, texts[command])
    return 0


def feedback(args, settings: Settings) -> int:
    from lorad.commands import CommandError

    record: dict = {}
    if args.record:
        text = sys.stdin.read() if args.record == "-" else args.record
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise CommandError(f"feedback: the record is not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise CommandError("feedback: the record must be a JSON object")
    for key, value in (
        ("id", args.id),
        ("prompt", args.prompt),
        ("completion", args.completion),
        ("status", args.status),
        ("score", args.score),
        ("feedback", args.feedback_text),
        ("parent_id", args.parent_id),
        ("source", args.origin),
        ("created_at", args.created_at),
    ):
        if value is not None:
            record[key] = value
    r = call(settings, "feedback", record=record, update=args.update, timeout=args.timeout)
    emit(args, r, f"recorded {r['id']} ({r['status']}, {r['result']})")
    return 0
