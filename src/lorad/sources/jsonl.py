"""Reader of an append-only JSONL feedback log.

One JSON object a line::

    {"id": "a2", "prompt": "...", "completion": "...", "status": "accepted",
     "feedback": "...", "parent_id": "a1", "source": "generated",
     "created_at": "2026-11-21T10:00:00Z"}

``messages`` (a chat list) may stand in for ``prompt``, and a numeric ``score`` for
``status`` (accepted at or above the source's score_threshold). Optional: ``workflow_id``,
``action_pair_id``, ``attempt_number``, ``metadata``.

The byte offset after the last complete line is committed with the rows it covers, so a
restart resumes exactly there. A partial last line is left for the next scan. Rows are keyed
by record id, so a line read twice updates nothing.

Rotation, either way logrotate does it, first finishes the lines past the committed offset in
the rotated file beside the log, then reads the live file from 0:

- rename (a new inode at the path): the old file is found by its inode
  (``feedback.jsonl.1``);
- copytruncate (the same inode, cut below the offset, or refilled with other bytes before
  it): the copy is the regular file beside the log whose first bytes are the ones we read
  and that reaches the offset. Compressed copies are not looked into: with copytruncate,
  logrotate's ``delaycompress`` keeps the newest copy plain until the next rotation.

Without such a file (a truncation by hand, an overwrite in place) the live file is read from
0. While a rotated file is being finished, each batch commits its place in that file, so a
restart half-way through finishes it. Only the rotated file that holds the committed offset is
read: a second rotation before the next scan (the watcher reacts within a second) would skip
the file between.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.buffer.batch import Batch, Quarantined
from lorad.config import BufferSettings
from lorad.sources.base import (
    ORIGINS,
    SQLITE_MAX_INT,
    ParseError,
    content_hash,
    decode_json,
    finite_number,
    json_text,
    kind,
    positive_int,
    shown,
    text,
    timestamp,
)

HEAD_BYTES = 256  # bytes fingerprinted to tell an overwritten file from the one we read

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer


def parse_record(
    line: bytes, *, source: str, score_threshold: float = 0.5, parents: dict[str, tuple[str, int | None]] | None = None
) -> dict:
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
            raise ParseError(f"status: must be accepted or rejected, got {shown(status)}")
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
        raise ParseError(f"source: must be one of {list(ORIGINS)}, got {shown(origin)}")
    created_at, created_ts = timestamp(obj.get("created_at"))
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ParseError(f"metadata: must be an object, got {kind(metadata)}")
    attempt = positive_int(obj, "attempt_number")

    parent = (parents or {}).get(parent_id) if parent_id else None
    workflow_id = text(obj, "workflow_id") or (parent[0] if parent else None) or parent_id or rid
    if attempt is None:
        if not parent_id:
            attempt = 1
        elif parent and parent[1]:
            if parent[1] >= SQLITE_MAX_INT:
                raise ParseError(f"attempt_number: one past its parent's ({parent[1]}) is past 2**63-1")
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
        "metadata": json_text(metadata, "metadata"),
        "messages": json_text(messages, "messages"),
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

    def scan(
        self, buffer: Buffer, batch_size: int = BufferSettings.batch_size, paths: Iterable[str] | None = None
    ) -> Iterator[Batch]:
        if paths is not None and not any(self._names_log(p) for p in paths):
            return
        state = buffer.source_state(self.key)
        parents = _known_parents(buffer, self.key)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        live = (st.st_ino, st.st_dev)
        offset, head = state.get("offset", 0), state.get("head", "")
        if state.get("inode") not in (None, st.st_ino):
            old = self._renamed(state["inode"], state.get("dev"))
        elif offset and (st.st_size < offset or _head(self.path, min(offset, HEAD_BYTES)) != head):
            old = self._copied(head, offset)
        else:
            yield from self._read(self.path, offset, head, live, batch_size, parents)
            return
        if old is not None:
            # Finish the rotated file first (its place in it is what each batch commits);
            # the live file is read from 0 after it.
            yield from self._read(old, offset, head, (state["inode"], state.get("dev")), batch_size, parents, then=live)
        yield from self._read(self.path, 0, "", live, batch_size, parents)

    def _names_log(self, path: str) -> bool:
        """Whether an event's path is the log or a rotated copy beside it (not a file of the
        same name in some other folder, or one reached through a symlinked folder)."""
        path = os.path.abspath(path)
        return os.path.basename(path).startswith(self.path.name) and os.path.dirname(path) == os.path.abspath(
            self.path.parent
        )

    def _beside(self) -> Iterator[tuple[Path, os.stat_result]]:
        """The files beside the log whose names start with its name (its rotated copies)."""
        for entry in os.scandir(self.path.parent):
            if entry.name != self.path.name and entry.name.startswith(self.path.name):
                try:
                    yield Path(entry.path), entry.stat(follow_symlinks=False)
                except OSError:
                    continue

    def _renamed(self, inode: int, dev: int | None) -> Path | None:
        """The file we were reading, renamed beside the log (rename rotation)."""
        for path, st in self._beside():
            if st.st_ino == inode and (dev is None or st.st_dev == dev):
                return path
        return None

    def _copied(self, head: str, offset: int) -> Path | None:
        """The copy of the file we were reading (copytruncate): a regular file beside the log
        that begins with the bytes we read and reaches the committed offset; the newest one
        when several do."""
        found = []
        for path, st in self._beside():
            # Regular files only: opening a FIFO named like a rotated copy would block.
            if stat.S_ISREG(st.st_mode) and st.st_size >= offset and _head(path, min(offset, HEAD_BYTES)) == head:
                found.append((st.st_mtime_ns, path.name, path))
        return max(found)[2] if found else None

    def _read(
        self,
        path: Path,
        offset: int,
        head: str,
        identity: tuple[int, int | None],
        batch_size: int,
        parents: dict,
        *,
        then: tuple[int, int] | None = None,
    ) -> Iterator[Batch]:
        """Read ``path`` from ``offset`` to its last complete line, in batches.

        Args:
            head: the digest of the file's first bytes up to the offset, as committed; a file
                that no longer begins with them was replaced since the scan looked at it, and
                is left to the next scan.
            identity: (inode, dev) the batches' state names; for a rotated file, the one the
                committed state named, so that a restart finds the same file again.
            then: for a rotated file: read it to its end (a last line without a newline is
                complete: nothing appends to it any more), and hand over to the live file,
                ``then`` (inode, dev), at offset 0 with the last batch.
        """
        final = then is not None
        batch = Batch(self.key)
        name = path.name
        with open(path, "rb") as f:
            # The head is read through this descriptor, once: what a later batch commits
            # describes the file read, even if the path is truncated or replaced meanwhile.
            first = os.pread(f.fileno(), min(offset, HEAD_BYTES), 0)
            if offset and _digest(first) != head:
                return
            f.seek(offset)
            pos = offset
            while True:
                line = f.readline(self.max_line_bytes + 1)
                if not line:
                    break
                if len(first) < HEAD_BYTES:
                    first += line[: HEAD_BYTES - len(first)]
                if not line.endswith(b"\n"):
                    if len(line) > self.max_line_bytes:
                        batch.quarantined.append(
                            Quarantined(self.key, f"{name}@{pos}", f"line over the {self.max_line_bytes}-byte limit")
                        )
                        rest = f.readline()  # skip to the end of that line
                        while rest and not rest.endswith(b"\n"):
                            rest = f.readline()
                        pos = f.tell()
                        continue
                    if not final:
                        first = first[:pos]  # not taken: the next scan reads it whole
                        break  # a line still being written: take it on the next scan
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    row = parse_record(
                        line.rstrip(b"\r\n"), source=self.key, score_threshold=self.score_threshold, parents=parents
                    )
                except ParseError as e:
                    batch.quarantined.append(Quarantined(self.key, f"{name}@{start}", str(e), None, len(line)))
                else:
                    parents[row["artifact_id"]] = (row["workflow_id"], row["attempt_number"])
                    batch.artifacts.append(row)
                if len(batch) >= batch_size:
                    batch.state = _state(identity, pos, first)
                    yield batch
                    batch = Batch(self.key)
        # The old file is done: the live file is read from its start next.
        batch.state = _state(then, 0, b"") if then is not None else _state(identity, pos, first)
        yield batch


def _state(identity: tuple[int, int | None], offset: int, first: bytes) -> dict:
    inode, dev = identity
    return {"inode": inode, "dev": dev, "offset": offset, "head": _digest(first[: min(offset, HEAD_BYTES)])}


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest() if data else ""


def _head(path: Path, n: int) -> str:
    """The digest of a file's first ``n`` bytes ("" for none, or a file that cannot be read)."""
    if n <= 0:
        return ""
    try:
        with open(path, "rb") as f:
            return _digest(f.read(n))
    except OSError:
        return ""


def _known_parents(buffer: Buffer, source: str) -> dict[str, tuple[str, int | None]]:
    rows = buffer.conn.execute(
        "SELECT artifact_id, workflow_id, attempt_number FROM artifacts WHERE source = ?", (source,)
    )
    return {aid: (wf, n) for aid, wf, n in rows}
