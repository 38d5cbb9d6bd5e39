"""Releasing adapter versions: promote or roll back, record it, publish it to the servers.

Every change of what serves goes through here, whoever asks for it (the pipeline's gate, the
live check, ``lorad promote``/``rollback``, the socket): the registry moves its pointer and
writes the audit row, then the publish hooks run, and a failed required hook reverts the
change. Also the live check (:func:`check_live`) and the examples watermarks the scheduler
and status read (:func:`since_seq`, :func:`trained_seq`). Torch-free.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog

from lorad import events
from lorad.release.registry import Change, Registry, RegistryError

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer
    from lorad.config import Settings

log = structlog.get_logger()


def open_registry(settings: Settings, buffer: Buffer | None = None) -> Registry:
    """The registry under ``settings.state_dir``; its changes go to ``buffer``'s audit table when given."""
    return Registry(
        settings.state.adapters,
        settings.registry.keep,
        settings.registry.keep_best,
        audit=buffer.record_event if buffer is not None else None,
    )


def promote(settings: Settings, buffer: Buffer, version: str, reason: str = "promoted by hand", **detail: Any) -> dict:
    """Promote a version (sha256 checked), record it, run the publish hooks.

    Returns:
        ``{"change": Change.as_dict(), "publish": PublishReport.as_dict()}``.

    Raises:
        RegistryError: unknown or tampered version, or already current.
    """
    registry = open_registry(settings, buffer)
    change = registry.promote(version, reason=reason, **detail)
    log.info(events.ADAPTER_PROMOTED, version=change.version, replaced=change.replaced, reason=reason)
    return {"change": change.as_dict(), "publish": publish(settings, buffer, change)}


def rollback(
    settings: Settings, buffer: Buffer, version: str | None = None, reason: str = "rolled back by hand", **detail: Any
) -> dict:
    """Roll back to ``version`` (default: the previous blessed one), record it, run the hooks.

    Raises:
        RegistryError: nothing to roll back to, unknown or tampered version.
    """
    registry = open_registry(settings, buffer)
    change = registry.rollback(version, reason=reason, **detail)
    log.warning(events.ADAPTER_ROLLED_BACK, version=change.version, replaced=change.replaced, reason=reason)
    return {"change": change.as_dict(), "publish": publish(settings, buffer, change)}


def publish(settings: Settings, buffer: Buffer, change: Change, cancel: threading.Event | None = None) -> dict:
    """Run the ``[[publish]]`` hooks for a change already made; a failed required hook reverts it.

    Args:
        cancel: once set, hooks still waiting on a server stop and fail as cancelled.

    Returns:
        ``PublishReport.as_dict()``.
    """
    from lorad.release import hooks

    tables = hooks.hooks_from_settings(settings.publish, settings.training.base_model)
    report = hooks.publish(
        open_registry(settings, buffer),
        change,
        tables,
        audit=buffer.record_event if buffer is not None else None,
        cancel=cancel,
    )
    return report.as_dict()


def hook_deadline(settings: Settings) -> float:
    """Seconds one publish request may take as a whole: the largest ``[[publish]] timeout``
    (0 without hooks). What a stopping daemon waits, at most, for hooks in flight."""
    return max((t.timeout for t in settings.publish), default=0.0)


def check_live(settings: Settings, buffer: Buffer) -> dict | None:
    """Roll back when live first-attempt acceptance of the active version fell significantly.

    Returns:
        None when there is no active and previous version to compare; else the counts, the
        reasons and whether it rolled back.
    """
    from lorad.evaluation.live import decide_live, live_counts

    e = settings.evaluation
    registry = open_registry(settings)
    cur, prev = registry.current(), registry.previous()
    if not (e.live_metadata_key and cur and prev):
        return None
    counts = live_counts(buffer.conn, e.live_metadata_key, [cur, prev])
    decision = decide_live(counts[cur], counts[prev], e.live_confidence, e.live_min_attempts)
    out = {
        "kind": "live",
        "active": cur,
        "previous": prev,
        "rolled_back": False,
        "counts": {v: {"accepted": r.accepted, "attempts": r.attempts} for v, r in counts.items()},
        "reasons": decision.reasons,
    }
    if decision.roll_back:
        done = rollback(settings, buffer, None, reason="live: " + decision.reasons[0], live=out["counts"])
        out |= {"rolled_back": True, "to": done["change"]["version"], "publish": done["publish"]}
    return out


def since_seq(registry: Registry) -> int:
    """The examples seq the active version's snapshot reached (0 with no active version)."""
    return _max_seq(registry, registry.current())


def trained_seq(registry: Registry) -> int:
    """The examples seq the newest snapshot of any version reached, promoted or rejected."""
    return max([0, *(_max_seq(registry, name) for name in registry.names())])


def _max_seq(registry: Registry, name: str | None) -> int:
    if name is None:
        return 0
    try:
        return int((registry.get(name).record.get("examples") or {}).get("max_seq") or 0)
    except (RegistryError, TypeError, ValueError):
        return 0
