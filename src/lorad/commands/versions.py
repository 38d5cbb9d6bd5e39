"""Offline adapter versions: `lorad history`, `lorad promote VERSION`, `lorad rollback [VERSION]`.

They read and change ``state_dir/adapters`` directly (the registry takes a file lock, so a
daemon running at the same time sees a consistent registry); promotion and rollback verify
the version's sha256 first, run the ``[[publish]]`` hooks and write the buffer's audit table.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from lorad.commands import emit

if TYPE_CHECKING:
    from lorad.config import Settings


def register(sub, common) -> None:
    p = sub.add_parser(
        "history",
        parents=[common],
        help="adapter versions with their metrics and verdicts (offline, from the state directory)",
    )
    p.add_argument("version", nargs="?", metavar="VERSION", help="show one version's lorad.json in full")
    p.add_argument("--limit", type=int, default=20, help="how many versions, newest first (default 20)")
    p.set_defaults(func=history)

    p = sub.add_parser(
        "promote", parents=[common], help="make VERSION the serving adapter (refused if its files fail their sha256)"
    )
    p.add_argument("version", metavar="VERSION", help="a version name, or its number (v0007 or 7)")
    p.add_argument("--reason", default="promoted by hand")
    p.set_defaults(func=promote)

    p = sub.add_parser("rollback", parents=[common], help="serve the previous blessed version again (or VERSION)")
    p.add_argument("version", nargs="?", metavar="VERSION", help="default: the previous blessed version")
    p.add_argument("--reason", default="rolled back by hand")
    p.set_defaults(func=rollback)


def history(args, settings: Settings) -> int:
    from lorad.commands import CommandError
    from lorad.commands.render import metrics_table
    from lorad.evaluation.live import live_rates
    from lorad.release import open_registry
    from lorad.release.history import history as history_view
    from lorad.release.registry import RegistryError

    reg = open_registry(settings)
    if args.version:
        try:
            v = reg.get(args.version)
        except RegistryError as e:
            raise CommandError(str(e)) from None
        problems = reg.verify(v.name)
        payload = v.record | {"sha256_ok": not problems, "sha256_problems": problems}
        r = v.record
        verdict = r.get("verdict") or {}
        cmp = r.get("compared_with") or {}
        lines = [
            f"{v.name}  {'PROMOTED' if verdict.get('promote') else 'REJECTED'} by the gate"
            f"{'  (current)' if reg.current() == v.name else ''}"
            f"{'  (previous)' if reg.previous() == v.name else ''}",
            f"created {r.get('created_at')}  job {r.get('job_id')}  parent {r.get('parent') or '-'}",
            f"base {r.get('base_model')}  method {r.get('method')}  "
            + "  ".join(f"{k}={val}" for k, val in (r.get("hyperparameters") or {}).items()),
            f"examples {(r.get('examples') or {}).get('count')} (max seq {(r.get('examples') or {}).get('max_seq')}), "
            f"held-out {(r.get('heldout') or {}).get('count')}",
        ]
        if r.get("metrics"):
            lines.append(metrics_table(r["metrics"], cmp.get("label", "active"), cmp.get("version")))
        live = live_rates(settings, [v.name]).get(v.name)
        if live is not None:
            payload["live"] = live.as_dict()
            lines.append(f"live: {_live(live)} (the generator's traffic while it served)")
        lines += [f"  - {reason}" for reason in verdict.get("reasons", [])]
        flips = task_flips(r.get("metrics") or {}, cmp.get("label", "active"))
        if flips is not None:
            payload["flips"] = flips
            lines += _flip_lines(flips, cmp.get("version"))
        lines.append("files: sha256 ok" if not problems else "files: " + "; ".join(problems))
        emit(args, payload, "\n".join(lines))
        return 0 if not problems else 1

    view = history_view(settings, limit=args.limit)
    cur, prev, rows, events = view["current"], view["previous"], view["versions"], view["events"]
    lines = [f"current {cur or '- (base model)'}   previous {prev or '-'}"]
    lines += [f"WARNING {p} (refused; lorad promote VERSION repairs it)" for p in view["problems"]]
    if not rows:
        lines.append("no adapter versions yet")
    else:
        lines.append(
            f"{'':2}{'VERSION':<24} {'VERDICT':<9} {'NLL':>8} {'BASE NLL':>9} {'ε':>7} {'BASE ε':>7} "
            f"{'LIVE 1ST':>13} {'ATTEMPTS':>8}  REASON"
        )
    for row in rows:
        mark = "*" if row["current"] else "p" if row["previous"] else " "
        verdict = "promote" if row["verdict"].get("promote") else "reject"
        reason = (
            _headline(row["verdict"]) if row["record_ok"] else "lorad.json EDITED since it was made: not to be trusted"
        )
        rate = row["live"]
        first = f"{rate['first_try']:.0%} ({rate['accepted']}/{rate['attempts']})" if rate and rate["attempts"] else "-"
        tries = f"{rate['mean_attempts']:.2f}" if rate and rate["attempts"] else "-"
        lines.append(
            f"{mark} {row['version']:<24} {verdict:<9} {_f(row['nll']):>8} {_f(row['baseline_nll']):>9} "
            f"{_pct(row['epsilon']):>7} {_pct(row['baseline_epsilon']):>7} {first:>13} {tries:>8}  {reason}"
        )
    if events:
        lines.append("recent events:")
        for event in events[:10]:
            when = datetime.fromtimestamp(event["ts"]).strftime("%Y-%m-%d %H:%M:%S")
            why = event["detail"].get("reason") or "; ".join(event["detail"].get("reasons") or [])
            why = why if len(why) <= 110 else why[:107] + "..."
            lines.append(f"  {when} {event['event']:<24} {event['version'] or '-'}  {why}")
    emit(args, view, "\n".join(lines))
    return 0


def _live(rate) -> str:
    if not rate.attempts:
        return "no tagged attempts yet"
    return (
        f"first try {rate.value:.1%} ({rate.accepted}/{rate.attempts} tasks), {rate.mean_attempts:.2f} attempts a task"
    )


def task_flips(metrics: dict, baseline: str = "active") -> dict | None:
    """Which held-out tasks the candidate passed that the baseline failed (gained) and the
    reverse (lost), from the per-task guard outcomes stored with the version (None: unguarded)."""
    from lorad.evaluation.gate import paired_test

    base, cand = metrics.get(baseline) or {}, metrics.get("candidate") or {}
    pairs = paired_test(base, cand)
    if pairs is None:
        return None
    names = {
        g.get("task_key") or g.get("chain_id"): g.get("task") or g.get("chain_id") or ""
        for g in cand.get("guard") or []
    }
    return {
        "tasks": pairs.tasks,
        "baseline_passed": pairs.first,
        "candidate_passed": pairs.second,
        "p": pairs.p,
        "gained": [{"task_key": k, "task": names.get(k, "")} for k in pairs.gained_tasks],
        "lost": [{"task_key": k, "task": names.get(k, "")} for k in pairs.lost_tasks],
    }


def _flip_lines(flips: dict, baseline_version: str | None) -> list[str]:
    gained, lost = flips["gained"], flips["lost"]
    lines = [
        f"first attempts on {flips['tasks']} held-out tasks, candidate vs {baseline_version or 'base model'}: "
        f"{len(gained)} gained, {len(lost)} lost, {flips['candidate_passed'] - len(gained)} passed by both "
        f"(exact McNemar p = {flips['p']:.4g})"
    ]
    for mark, group in (("+", gained), ("-", lost)):
        for t in group:
            lines.append(f"  {mark} {t['task_key'][:8]}  {t['task'][:90]}")
    return lines


def _headline(verdict: dict) -> str:
    """The reason worth a column: the first failed check, or the loss change of a promotion."""
    reasons = verdict.get("reasons") or [""]
    if verdict.get("promote"):
        return next((r for r in reasons if r.startswith("held-out loss")), reasons[0])
    return reasons[0]


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "-"


def _change(args, settings: Settings, action: str) -> int:
    from lorad import release
    from lorad.buffer.store import Buffer
    from lorad.commands import CommandError
    from lorad.release.registry import RegistryError

    done = _through_daemon(settings, action, args.version, args.reason)
    if done is None:  # no daemon running: change the registry here
        fn = release.promote if action == "promote" else release.rollback
        try:
            with Buffer(settings.buffer_path, settings.buffer.synchronous) as buffer:
                done = fn(settings, buffer, args.version, reason=args.reason)
        except RegistryError as e:
            raise CommandError(str(e)) from None
    change, report = done["change"], done["publish"]
    verb = "promoted" if action == "promote" else "rolled back to"
    lines = [
        f"{verb} {change['version']} (was {change['replaced'] or 'base model'}); "
        f"previous is now {change['previous'] or '-'}"
    ]
    for r in report["results"]:
        lines.append(f"publish {r['hook']}: {'ok' if r['ok'] else 'FAILED'} {r['detail']}".rstrip())
    if report["reverted"]:
        lines.append(f"REVERTED: {report['reverted']['reason']}")
    emit(args, done, "\n".join(lines))
    return 1 if report["reverted"] or not report["ok"] else 0


PROMOTE_TIMEOUT = 600.0  # seconds lorad promote/rollback wait for the daemon's answer


def _through_daemon(settings: Settings, action: str, version, reason: str) -> dict | None:
    """With a daemon running, it makes the change (so it never races its own job's conclusion)."""
    from lorad.commands import CommandError
    from lorad.commands.client import EX_TEMPFAIL, socket_path
    from lorad.daemon.protocol import DaemonTimeout, DaemonUnavailable, ProtocolError, SocketPathTooLong, request

    try:
        # Generous: the daemon answers after the publish hooks, which may retry a slow server.
        r = request(socket_path(settings), action, timeout=PROMOTE_TIMEOUT, version=version, reason=reason)
    except (DaemonUnavailable, ProtocolError, SocketPathTooLong):
        return None
    except DaemonTimeout as e:  # never fall back to a second change of our own: it may be applied
        raise CommandError(f"{action}: {e}", EX_TEMPFAIL) from None
    if not r.get("ok"):
        raise CommandError(r.get("error") or f"the daemon refused the {action}")
    return {"change": r["change"], "publish": r["publish"]}


def promote(args, settings: Settings) -> int:
    return _change(args, settings, "promote")


def rollback(args, settings: Settings) -> int:
    return _change(args, settings, "rollback")
