"""Reader of an append-only JSONL feedback log.

One JSON object a line::

    {"id": "a2", "prompt": "...", "completion": "...", "status": "accepted",
     "feedback": "...", "parent_id": "a1", "source": "generated",
     "created_at": "2026-11-21T10:00:00Z"}

``messages`` (a chat list) may stand in for ``prompt``, and a numeric ``score`` for
``status`` (accepted at or above the source's score_threshold). Optional: ``workflow_id``,
``action_pair_id``, ``attempt_number``, ``metadata``.

The byte offset after the last complete line is committed with the rows it covers, so a
restart resumes exactly there. A partial last line is left for the next scan. Truncation
(size below the offset, or different bytes before it) restarts from 0; rotation (a new
inode at the path) first finishes the old file, found by its inode beside the new one
(``feedback.jsonl.1``), then starts the new one at 0. Rows are keyed by record id, so a line
read twice updates nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.buffer.batch import Batch, Quarantined
from lorad.sources.base import (
    ORIGINS, ParseError, content_hash, decode_json, finite_number, json_text, kind, text, timestamp,
)

HEAD_BYTES = 256  # bytes fingerprinted to tell an overwritten file from the one we read

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer


def parse_record(line: bytes, *, source: str, score_threshold: float = 0.5,
                 parents: dict[str, tuple[str, int | None]] | None = None) -> dict:
    """One JSONL line -> a normalised ``artifacts`` row.

    Args:
        parents: id -> (workflow_id, attempt_number) of records already known, used to put a
            record without a workflow_id into its parent's chain.

    Raises:
        ParseError: with the reason.
    """
    obj = decode_json(line)
    if not isinstance(obj, dict):
        raise ParseError(f"record must be a JSON object, got {kind(obj)}")
    rid = obj.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool):
        rid = str(rid)
    if not isinstance(rid, str) or not rid:
        raise ParseError("id: required non-empty string (or integer)")
    completion = text(obj, "completion", required=True)
    prompt = text(obj, "prompt")
    messages = obj.get("messages")
    constraints = ""
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ParseError("messages: must be an array of {role, content} objects with string values")
        users = [m["content"] for m in messages if m["role"] == "user"]
        systems = [m["content"] for m in messages if m["role"] == "system"]
        prompt = prompt if prompt is not None else (users[-1] if users else "")
        constraints = "\n\n".join(systems)
    if prompt is None:
        raise ParseError("prompt: required (or messages)")

    status, score = obj.get("status"), finite_number(obj, "score")  # NaN would compare as "rejected"
    if status is not None:
        if status not in ("accepted", "rejected"):
            raise ParseError(f"status: must be accepted or rejected, got {status!r}"[:200])
    elif score is not None:
        status = "accepted" if score >= score_threshold else "rejected"
    else:
        raise ParseError("status: required (accepted or rejected), or a numeric score")

    parent_id = obj.get("parent_id")
    if isinstance(parent_id, int) and not isinstance(parent_id, bool):
        parent_id = str(parent_id)
    if parent_id is not None and not isinstance(parent_id, str):
        raise ParseError(f"parent_id: must be a string, got {kind(parent_id)}")
    origin = obj.get("source") or "generated"
    if origin not in ORIGINS:
        raise ParseError(f"source: must be one of {list(ORIGINS)}, got {origin!r}"[:200])
    created_at, created_ts = timestamp(obj.get("created_at"))
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ParseError(f"metadata: must be an object, got {kind(metadata)}")
    attempt = obj.get("attempt_number")
    if attempt is not None and (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1):
        raise ParseError(f"attempt_number: must be an integer >= 1, got {attempt!r}"[:200])

    parent = (parents or {}).get(parent_id) if parent_id else None
    workflow_id = text(obj, "workflow_id") or (parent[0] if parent else None) or parent_id or rid
    if attempt is None:
        if not parent_id:
            attempt = 1
        elif parent and parent[1]:
            attempt = parent[1] + 1
    feedback = text(obj, "feedback")
    return {
        "source": source,
        "locator": rid,
        "artifact_id": rid,
        "workflow_id": workflow_id,
        "action_pair_id": text(obj, "action_pair_id") or "feedback",
        "parent_action_pair_id": None,
        "previous_attempt_id": parent_id,
        "attempt_number": attempt,
        "status": status,
        "created_at": created_at,
        "created_ts": created_ts,
        "content": completion,
        "passed": int(status == "accepted"),
        "fatal": 0,
        "feedback": feedback,
        "sub_results": None,
        "specification": prompt,
        "constraints": constraints,
        "feedback_history": None,
        "dependency_artifacts": None,
        "origin": origin,
        "metadata": json_text(metadata),
        "messages": json_text(messages),
        "score": score,
        "content_hash": content_hash(line),
        "file_size": None,  # a line, not a file of its own: the source's offset says what was read
        "file_mtime_ns": None,
    }


class JsonlSource:
    """Reads one append-only JSONL feedback log, resuming at the committed byte offset."""

    def __init__(self, key: str, path: Path, score_threshold: float = 0.5, max_line_bytes: int = 8 << 20):
        self.key = key
        self.path = Path(path)
        self.score_threshold = score_threshold
        self.max_line_bytes = max_line_bytes

    def watch_paths(self) -> list[Path]:
        return [self.path.parent]

    def scan(self, buffer: Buffer, batch_size: int = 500, paths: Iterable[str] | None = None) -> Iterator[Batch]:
        if paths is not None and not any(self._names_log(p) for p in paths):
            return
        state = buffer.source_state(self.key)
        parents = _known_parents(buffer, self.key)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if state.get("inode") not in (None, st.st_ino):
            old = self._rotated(state["inode"], state.get("dev"))
            if old is not None:
                # Finish the rotated file first; then the new one starts at 0.
                yield from self._read(old, state["offset"], state, batch_size, parents, final=True,
                                      next_identity=(st.st_ino, st.st_dev))
            state = {"inode": st.st_ino, "dev": st.st_dev, "offset": 0, "head": ""}
        offset = state.get("offset", 0)
        if offset and (st.st_size < offset or _head(self.path, min(offset, HEAD_BYTES)) != state.get("head")):
            offset = 0  # truncated (or replaced in place): everything there is new
        state = {"inode": st.st_ino, "dev": st.st_dev, "offset": offset, "head": state.get("head", "")}
        yield from self._read(self.path, offset, state, batch_size, parents, final=False)

    def _names_log(self, path: str) -> bool:
        """Whether an event's path is the log or a rotated copy beside it (not a file of the
        same name in some other folder, or one reached through a symlinked folder)."""
        path = os.path.abspath(path)
        return (os.path.basename(path).startswith(self.path.name)
                and os.path.dirname(path) == os.path.abspath(self.path.parent))

    def _rotated(self, inode: int, dev: int | None) -> Path | None:
        folder = self.path.parent
        for entry in os.scandir(folder):
            if entry.name != self.path.name and entry.name.startswith(self.path.name):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_ino == inode and (dev is None or st.st_dev == dev):
                    return Path(entry.path)
        return None

    def _read(self, path: Path, offset: int, state: dict, batch_size: int, parents: dict, *, final: bool,
              next_identity: tuple[int, int] | None = None) -> Iterator[Batch]:
        batch = Batch(self.key)
        name = path.name
        with open(path, "rb") as f:
            f.seek(offset)
            pos = offset
            while True:
                line = f.readline(self.max_line_bytes + 1)
                if not line:
                    break
                if not line.endswith(b"\n"):
                    if len(line) > self.max_line_bytes:
                        batch.quarantined.append(Quarantined(
                            self.key, f"{name}@{pos}", f"line over the {self.max_line_bytes}-byte limit"))
                        rest = f.readline()  # skip to the end of that line
                        while rest and not rest.endswith(b"\n"):
                            rest = f.readline()
                        pos = f.tell()
                        continue
                    if not final:
                        break  # a line still being written: take it on the next scan
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    row = parse_record(line.rstrip(b"\r\n"), source=self.key,
                                       score_threshold=self.score_threshold, parents=parents)
                except ParseError as e:
                    batch.quarantined.append(Quarantined(self.key, f"{name}@{start}", str(e), None, len(line)))
                else:
                    parents[row["artifact_id"]] = (row["workflow_id"], row["attempt_number"])
                    batch.artifacts.append(row)
                if len(batch) >= batch_size:
                    batch.state = self._state(state, pos, final, next_identity)
                    yield batch
                    batch = Batch(self.key)
        batch.state = self._state(state, pos, final, next_identity)
        yield batch

    def _state(self, state: dict, pos: int, final: bool, next_identity) -> dict:
        if final:
            # The old file is done; the live file is read from its start next.
            ino, dev = next_identity
            return {"inode": ino, "dev": dev, "offset": 0, "head": ""}
        return {"inode": state["inode"], "dev": state["dev"], "offset": pos,
                "head": _head(self.path, min(pos, HEAD_BYTES))}


def _head(path: Path, n: int) -> str:
    if n <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(n), digest_size=8).hexdigest()
    except OSError:
        return ""


def _known_parents(buffer: Buffer, source: str) -> dict[str, tuple[str, int | None]]:
    rows = buffer.conn.execute(
        "SELECT artifact_id, workflow_id, attempt_number FROM artifacts WHERE source = ?", (source,)
    )
    return {aid: (wf, n) for aid, wf, n in rows}
