"""Feedback pushed over the socket (``lorad feedback``): one attempt, validated and committed.

The daemon's only write for a client besides version changes; it runs on the ingest loop's
thread (the buffer's one writer).
"""

from __future__ import annotations

import json
from concurrent.futures import Future

import structlog

from lorad import events
from lorad.buffer.store import Batch, Buffer
from lorad.daemon import protocol

log = structlog.get_logger()

FEEDBACK_SOURCE = "feedback"


class FeedbackRejected(Exception):
    "A pushed feedback record is not valid; the message says why."


class FeedbackConflict(FeedbackRejected):
    "Another record is already stored under this id, and the request is not an update."


def write_feedback(buffer: Buffer, record: dict, score_threshold: float = 0.5, update: bool = False) -> dict:
    """Validate one pushed attempt like a JSONL source line and commit it (source "feedback").

    A record sent again as it is stored changes nothing. One whose id is stored with other
    content (a verdict flipped from accepted to rejected, say) replaces it only with ``update``.

    Raises:
        FeedbackRejected: the record does not parse; nothing was written.
        FeedbackConflict: the id holds another record and ``update`` is false; nothing was written.

    Returns:
        The response for the client, sent only after the commit.
    """
    from lorad.sources.base import LONE_SURROGATE, ParseError
    from lorad.sources.jsonl import parse_record

    try:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True).encode()
    except UnicodeEncodeError:  # the request's JSON held an escape such as "\ud800"
        raise FeedbackRejected(f"feedback record refused: {LONE_SURROGATE}") from None
    parents = {}
    pid = record.get("parent_id")
    if isinstance(pid, (str, int)) and not isinstance(pid, bool):
        row = buffer.conn.execute(
            "SELECT workflow_id, attempt_number FROM artifacts WHERE source = ? AND locator = ?",
            (FEEDBACK_SOURCE, str(pid)),
        ).fetchone()
        if row:
            parents[str(pid)] = (row[0], row[1])
    try:
        row = parse_record(line, source=FEEDBACK_SOURCE, score_threshold=score_threshold, parents=parents)
    except ParseError as e:
        raise FeedbackRejected(f"feedback record refused: {e}") from None
    stored = buffer.conn.execute(
        "SELECT content_hash, status FROM artifacts WHERE source = ? AND locator = ?", (FEEDBACK_SOURCE, row["locator"])
    ).fetchone()
    if stored and stored[0] != row["content_hash"] and not update:
        log.warning(
            events.FEEDBACK_CONFLICT_REFUSED, id=row["artifact_id"], stored_status=stored[1], status=row["status"]
        )
        raise FeedbackConflict(
            f"feedback {row['artifact_id']!r} conflicts with the record stored under that id "
            f"(stored {stored[1]}, sent {row['status']}, other content); nothing was changed: "
            f'send it as an update (lorad feedback --update, "update": true) to replace it'
        )
    batch = Batch(FEEDBACK_SOURCE)
    batch.artifacts.append(row)
    new, updated, unchanged = buffer.write_batch(batch)
    log.info(events.FEEDBACK_RECORDED, id=row["artifact_id"], status=row["status"], new=bool(new))
    return {
        "ok": True,
        "id": row["artifact_id"],
        "status": row["status"],
        "result": "new" if new else "updated" if updated else "unchanged",
    }


def acknowledge(queued: Future, wait: float) -> dict:
    """The client's answer to a feedback write queued on the ingest thread.

    Args:
        queued: the write (:func:`write_feedback`), submitted to the ingest loop.
        wait: seconds to wait for its commit; it should end before the client's own timeout,
            so the client hears why.

    Returns:
        The write's response, an error for a refused record (``"conflict": true`` for a
        conflict), or, when the ingest thread has not come to it in time (an examples refresh
        or a long scan runs first), an error with ``"pending": true``: the write stays queued
        and will commit, so the record may still be applied (the client exits 75).
    """
    try:
        return queued.result(wait)
    except FeedbackConflict as e:
        return {**protocol.error(str(e)), "conflict": True}
    except FeedbackRejected as e:
        return protocol.error(str(e))
    except TimeoutError:
        return {
            **protocol.error(
                f"feedback not committed within {wait:g} s: the daemon's ingest thread is busy "
                "(an examples refresh or a long scan); the record is queued and may still be "
                "applied (check before sending it again)"
            ),
            "pending": True,
        }
