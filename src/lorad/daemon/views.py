"""What the daemon reads for its answers, and the small writes it makes for clients.

Thin wrappers over the buffer and the registry, kept out of :mod:`lorad.daemon.service` so
the service reads as a loop. Nothing here imports torch.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import structlog

from lorad.buffer.store import Batch, Buffer

log = structlog.get_logger()

FEEDBACK_SOURCE = "feedback"


class FeedbackRejected(Exception):
    "A pushed feedback record is not valid; the message says why."


def active_version(state_dir: Path) -> str | None:
    """The name ``adapters/current`` points at (a readlink; no lock, no file reads)."""
    from lorad.registry import Registry

    return Registry(Path(state_dir) / "adapters").current()


def registry_problems(state_dir: Path) -> list[str]:
    """Why ``current`` or ``previous`` is not believed (a pointer bent outside lorad); empty when sound."""
    from lorad.registry import Registry

    return Registry(Path(state_dir) / "adapters").pointer_problems()


def buffer_counts(reader: Buffer, state_dir: Path | None = None) -> dict:
    """Headline counts for ``lorad status``, from a read-only connection.

    ``new_examples`` counts training examples since the active version's snapshot (what
    status shows); ``untrained_examples`` those since the newest version of any verdict,
    which is what the scheduler waits for: a rejected candidate is not retrained on the
    same data at the next tick.
    """
    from lorad.buffer import examples

    counts = {"examples": 0, "new_examples": 0, "untrained_examples": 0}
    try:
        counts |= reader.counts() | examples.counts(reader)
        if state_dir is not None:
            from lorad.cycle import since_seq, trained_seq
            from lorad.registry import Registry

            registry = Registry(Path(state_dir) / "adapters")
            counts["new_examples"] = examples.count_new(reader, since_seq(registry))
            counts["untrained_examples"] = examples.count_new(reader, trained_seq(registry))
    except sqlite3.Error as e:  # e.g. a table not migrated yet by the writer: report zeros
        log.debug("example_counts_failed", error=str(e))
    return counts


def history(settings) -> dict:
    """Versions (newest first) with their verdicts and metrics, and the pointers."""
    from lorad.cycle import open_registry

    reg = open_registry(settings)
    versions = []
    for v in reversed(reg.versions()):
        r = v.record
        versions.append({"version": v.name, "created_at": r.get("created_at"), "job_id": r.get("job_id"),
                         "parent": r.get("parent"), "verdict": v.verdict, "metrics": r.get("metrics"),
                         "record_ok": reg.record_ok(v.name)})
    return {"current": reg.current(), "previous": reg.previous(), "problems": reg.pointer_problems(),
            "versions": versions}


def change_version(settings, buffer: Buffer, action: str, version: str | None, reason: str | None = None) -> dict:
    """Promote or roll back by hand (sha256 checked, audited, publish hooks), as `lorad promote` does."""
    from lorad import cycle
    from lorad.registry import RegistryError

    registry = cycle.open_registry(settings, buffer)
    try:
        if action == "promote":
            if not version:
                return {"ok": False, "error": "promote needs a VERSION"}
            done = cycle.promote(settings, buffer, registry, version, reason=reason or "promoted by hand")
        else:
            done = cycle.rollback(settings, buffer, registry, version or None,
                                  reason=reason or "rolled back by hand")
    except RegistryError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, **done}


def write_feedback(buffer: Buffer, record: dict, score_threshold: float = 0.5) -> dict:
    """Validate one pushed attempt like a JSONL source line and commit it (source "feedback").

    Raises:
        FeedbackRejected: the record does not parse; nothing was written.

    Returns:
        The response for the client, sent only after the commit.
    """
    from lorad.sources.base import ParseError
    from lorad.sources.jsonl import parse_record

    line = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
    parents = {}
    pid = record.get("parent_id")
    if isinstance(pid, (str, int)) and not isinstance(pid, bool):
        row = buffer.conn.execute(
            "SELECT workflow_id, attempt_number FROM artifacts WHERE source = ? AND locator = ?",
            (FEEDBACK_SOURCE, str(pid))).fetchone()
        if row:
            parents[str(pid)] = (row[0], row[1])
    try:
        row = parse_record(line, source=FEEDBACK_SOURCE, score_threshold=score_threshold, parents=parents)
    except ParseError as e:
        raise FeedbackRejected(f"feedback record refused: {e}") from None
    batch = Batch(FEEDBACK_SOURCE)
    batch.artifacts.append(row)
    new, updated, unchanged = buffer.write_batch(batch)
    log.info("feedback_recorded", id=row["artifact_id"], status=row["status"], new=bool(new))
    return {"ok": True, "id": row["artifact_id"], "status": row["status"],
            "result": "new" if new else "updated" if updated else "unchanged"}
