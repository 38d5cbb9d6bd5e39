"""What the daemon reads for its answers, and the small writes it makes for clients.

Thin wrappers over the buffer and the registry, kept out of :mod:`lorad.daemon.service` so
the service reads as a loop. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from lorad.buffer.store import Batch, Buffer

log = structlog.get_logger()

FEEDBACK_SOURCE = "feedback"


class FeedbackRejected(Exception):
    "A pushed feedback record is not valid; the message says why."


def registry(settings):
    from lorad.registry import Registry

    return Registry(settings.state_dir / "adapters", settings.registry.keep, settings.registry.keep_best)


def active_version(state_dir: Path) -> str | None:
    """The name ``adapters/current`` points at (a readlink; no lock, no file reads)."""
    from lorad.registry import Registry

    return Registry(Path(state_dir) / "adapters").current()


def since_seq(state_dir: Path) -> int:
    """The examples sequence number the active version was trained up to (0 with none)."""
    from lorad.registry import Registry, RegistryError

    reg = Registry(Path(state_dir) / "adapters")
    name = reg.current()
    if name is None:
        return 0
    try:
        record = reg.get(name).record
    except RegistryError:
        return 0
    examples = record.get("examples") or {}
    for key in ("max_seq", "since_seq", "seq"):
        if isinstance(examples.get(key), int):
            return examples[key]
    return 0


def buffer_counts(reader: Buffer, state_dir: Path | None = None) -> dict:
    """Headline counts for ``lorad status``, from a read-only connection."""
    counts = reader.counts()
    counts.setdefault("examples", 0)
    counts.setdefault("new_examples", 0)
    try:
        from lorad.buffer import examples
    except ImportError:  # the examples table is not built by this version
        return counts
    try:
        counts.update(examples.counts(reader))
    except AttributeError:
        pass
    except Exception as e:  # a table not migrated yet: report zeros, not an error
        log.debug("example_counts_failed", error=str(e))
    if state_dir is not None:
        try:
            counts["new_examples"] = examples.count_new(reader, since_seq(state_dir))
        except Exception as e:
            log.debug("example_counts_failed", error=str(e))
    return counts


def history(settings, reader: Buffer) -> dict:
    """Versions (newest first) with their verdicts and metrics, and the pointers."""
    reg = registry(settings)
    versions = []
    for v in reversed(reg.versions()):
        r = v.record
        versions.append({
            "version": v.name, "created_at": r.get("created_at"), "job_id": r.get("job_id"),
            "parent": r.get("parent"), "verdict": v.verdict, "metrics": r.get("metrics"),
            "nll": v.nll,
        })
    return {"current": reg.current(), "previous": reg.previous(), "versions": versions,
            "pointer_log": reg.pointer_log()[-50:]}


def change_version(settings, action: str, version: str | None) -> dict:
    """Promote or roll back by hand, with the publish hooks, as the offline command does."""
    from lorad.registry import RegistryError

    reg = registry(settings)
    try:
        if action == "promote":
            if not version:
                return {"ok": False, "error": "promote needs a VERSION"}
            change = reg.promote(version, reason="promoted by hand")
        else:
            change = reg.rollback(version or None, reason="rolled back by hand")
    except RegistryError as e:
        return {"ok": False, "error": str(e)}
    published = _publish(settings, reg, change)
    return {"ok": True, "change": change.as_dict(), "published": published}


def _publish(settings, reg, change) -> list:
    try:
        from lorad import publish
    except ImportError:
        return []
    run = getattr(publish, "run_hooks", None) or getattr(publish, "publish", None)
    if run is None:
        return []
    try:
        result = run(settings, reg, change)
    except Exception as e:  # a failed optional hook must not undo a manual change silently
        log.error("publish_failed", error=str(e), version=change.version)
        return [{"ok": False, "error": str(e)}]
    return result if isinstance(result, list) else [result]


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
            "SELECT workflow_id, attempt_number FROM artifacts WHERE source = ? AND artifact_id = ?",
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
