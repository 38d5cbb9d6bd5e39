"""What a cycle hands its front ends: the Outcome, the stop request, the base error."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field


class CycleError(Exception):
    "A cycle cannot start or finish; the message says why."


@dataclass
class Outcome:
    """What one cycle did, for the CLI, the daemon and the audit trail.

    ``status`` is the job's final state (promoted | rejected | failed | paused | cancelled |
    skipped), or ``busy`` when ``lorad train`` found another cycle running and made no job.
    """

    job_id: str
    status: str
    reason: str = ""
    version: str | None = None
    verdict: dict | None = None
    metrics: dict | None = None
    baseline: str = "active"  # which metrics the candidate was compared with
    baseline_version: str | None = None
    rollback: dict | None = None  # automatic rollback by re-scoring, when checked
    live: dict | None = None  # the live check, when it ran
    publish: list = field(default_factory=list)
    pruned: list = field(default_factory=list)
    training: dict = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def as_dict(self) -> dict:
        return asdict(self) | {"promoted": self.promoted}


class StopRequest:
    """Asked from another thread: stop the job at its next step, to pause it or to cancel it.

    ``event`` is set by either (the worker checkpoints and stops); ``cancelled`` only by a
    cancel: it also stops a conclusion's wait on its publish hooks. A pause does not, so a
    daemon stopping mid-conclusion leaves the hooks to run again at its next start.
    """

    def __init__(self):
        self.event = threading.Event()
        self.cancelled = threading.Event()
        self.mode = "pause"
        self.reason = ""

    def pause(self, reason: str) -> None:
        self.reason = reason
        self.event.set()

    def cancel(self, reason: str) -> None:
        self.mode, self.reason = "cancel", reason
        self.event.set()
        self.cancelled.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    @property
    def state(self) -> str:
        return "cancelled" if self.mode == "cancel" else "paused"
