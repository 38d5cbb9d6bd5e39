"""conclusion.json: what a conclusion has done, so a restart finishes it and does nothing twice."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lorad import events, release
from lorad.cycle.outcome import CycleError
from lorad.release.registry import Change, Registry
from lorad.training.jobdir import atomic_write

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer
    from lorad.config import Settings

log = structlog.get_logger()

JOURNAL_FILE = "conclusion.json"


class Journal:
    """conclusion.json: the steps of :func:`conclude`, each recorded as it completes, and the
    intent of each pointer move recorded before it moves.

    conclude run again on the same job (after a crash, a kill -9, a restart) reads it and
    finishes what was recorded: one version, at most one promotion or rollback, the publish
    hooks run for each once they were recorded as run (a hook in flight at the crash runs
    again, with the same change). Written and read by :mod:`lorad.cycle.conclusion` alone.
    """

    def __init__(self, job_dir):
        self.path = Path(job_dir) / JOURNAL_FILE
        try:
            self.entries: dict = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.entries = {}
        except ValueError as e:
            raise CycleError(f"{self.path}: unreadable conclusion journal: {e}") from None

    def get(self, key: str, default=None):
        return self.entries.get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def record(self, key: str, value) -> None:
        self.entries[key] = value
        atomic_write(self.path, json.dumps(self.entries, indent=2, default=str) + "\n")


def change_from(d: dict) -> Change:
    return Change(d["action"], d["version"], d["replaced"], d["previous"], tuple(d["before"]), d.get("reason", ""))


def move_once(journal: Journal, registry: Registry, key: str, intent: dict, move: Callable[[], Change]) -> Change:
    """Make a pointer move that ``intent`` ({"action", "to", "from", "previous", "reason"}) describes,
    once: recorded first as an intent, then as the change made."""
    if f"{key}_change" in journal:
        return change_from(journal.get(f"{key}_change"))
    if f"{key}_intent" not in journal:
        journal.record(f"{key}_intent", intent)
    elif registry.current() == intent["to"]:
        # It moved (and was audited) before the crash; only the journal did not hear of it.
        change = Change(
            intent["action"],
            intent["to"],
            intent["from"],
            registry.previous(),
            (intent["from"], intent["previous"]),
            intent["reason"],
        )
        journal.record(f"{key}_change", change.as_dict())
        return change
    change = move()
    journal.record(f"{key}_change", change.as_dict())
    emit = log.info if change.action == "promoted" else log.warning
    emit(_EVENT[change.action], version=change.version, replaced=change.replaced, reason=change.reason)
    return change


_EVENT = {"promoted": events.ADAPTER_PROMOTED, "rolled_back": events.ADAPTER_ROLLED_BACK}


def publish_once(
    journal: Journal, settings: Settings, buffer: Buffer, key: str, change: Change, cancel: threading.Event | None
) -> dict:
    report = journal.get(f"{key}_published")
    if report is None:
        # Recorded even when cancelled: whoever cancelled asked not to wait for the server,
        # and a restart must not start the wait again.
        report = release.publish(settings, buffer, change, cancel)
        journal.record(f"{key}_published", report)
    return report


def version_of(registry: Registry, journal: Journal, job_id: str):
    """The version this job already made, if a crash came after it was made."""
    name = journal.get("version")
    for v in registry.versions():
        if v.name == name or (name is None and v.record.get("job_id") == job_id):
            return v
    return None
