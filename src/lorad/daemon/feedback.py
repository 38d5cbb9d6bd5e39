"""Feedback pushed over the socket (``lorad feedback``): one attempt, validated and committed.

The daemon's only write for a client besides version changes; it runs on the ingest loop's
thread (the buffer's one writer).
"""

from __future__ import annotations

import json

import structlog

from lorad import events
from lorad.buffer.store import Batch, Buffer

log = structlog.get_logger()

FEEDBACK_SOURCE = "feedback"


class FeedbackRejected(Exception):
    "A pushed feedback record is not valid; the message says why."


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
    log.info(events.FEEDBACK_RECORDED, id=row["artifact_id"], status=row["status"], new=bool(new))
    return {"ok": True, "id": row["artifact_id"], "status": row["status"],
            "result": "new" if new else "updated" if updated else "unchanged"}
