"""Reader of an AtomicGuard FilesystemArtifactDAG: objects/<xx>/<artifact_id>.json + index.json.

Every artifact file is parsed on its own; index.json only supplies the workflow id that older
library versions kept there instead of in the object. A file already seen with the same size
and mtime is skipped without being read, so a rescan of an unchanged store costs one stat per
file. A file whose content changed (pending -> accepted) is read again and its row updated.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson

from lorad.buffer.batch import Batch, Gone, Quarantined
from lorad.config import BufferSettings, StoreSettings
from lorad.sources import pool
from lorad.sources.base import (
    ORIGINS,
    STATUSES,
    ParseError,
    content_hash,
    decode_json,
    json_text,
    kind,
    positive_int,
    safe_name,
    shown,
    text,
    timestamp,
)

if TYPE_CHECKING:
    from lorad.buffer.store import Buffer


def parse_artifact(data: bytes, *, source: str, locator: str, digest: str | None = None) -> dict:
    """One artifact file -> a normalised ``artifacts`` row.

    Accepts the current schema and the legacy forms atomicguard itself still reads
    (guard_result as a bare bool with the feedback beside it, feedback_history entries as
    [id, feedback] pairs, dependency_artifacts as pairs). An artifact with no workflow_id
    gets "" here; the scan fills it in from index.json, where older library versions kept it.

    Raises:
        ParseError: with the reason, for anything that is not a readable artifact.
    """
    obj = decode_json(data)
    if not isinstance(obj, dict):
        raise ParseError(f"artifact must be a JSON object, got {kind(obj)}")
    artifact_id = text(obj, "artifact_id", required=True)
    if not artifact_id:
        raise ParseError("artifact_id: must not be empty")
    content = text(obj, "content", required=True)
    action_pair_id = text(obj, "action_pair_id", required=True)
    status = obj.get("status")
    if status is None:
        raise ParseError("status: required field is missing")
    if status not in STATUSES:
        raise ParseError(f"status: must be one of {list(STATUSES)}, got {shown(status)}")
    attempt = positive_int(obj, "attempt_number", required=True)

    context = obj.get("context")
    if context is None:
        context = {}
    elif not isinstance(context, dict):
        raise ParseError(f"context: must be an object, got {kind(context)}")

    workflow_id = text(obj, "workflow_id") or text(context, "workflow_id", where="context.") or ""
    created_at, created_ts = timestamp(obj.get("created_at"))

    passed, fatal, feedback, sub_results = _guard_result(obj)
    origin = obj.get("source")
    if origin is None:
        origin = "generated"  # absent means generated (the schema's default)
    elif origin not in ORIGINS:
        raise ParseError(f"source: must be one of {list(ORIGINS)}, got {shown(origin)}")
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ParseError(f"metadata: must be an object, got {kind(metadata)}")

    return {
        "source": source,
        "locator": locator,
        "artifact_id": artifact_id,
        "workflow_id": workflow_id,
        "action_pair_id": action_pair_id,
        "parent_action_pair_id": text(obj, "parent_action_pair_id"),
        "previous_attempt_id": text(obj, "previous_attempt_id") or None,
        "attempt_number": attempt,
        "status": status,
        "created_at": created_at,
        "created_ts": created_ts,
        "content": content,
        "passed": None if passed is None else int(passed),
        "fatal": int(fatal),
        "feedback": feedback,
        "sub_results": json_text(sub_results, "guard_result.sub_results"),
        "specification": text(context, "specification", default="", where="context."),
        "constraints": text(context, "constraints", default="", where="context."),
        "feedback_history": json_text(_feedback_history(context.get("feedback_history")), "context.feedback_history"),
        "dependency_artifacts": json_text(
            _dependencies(context.get("dependency_artifacts")), "context.dependency_artifacts"
        ),
        "origin": origin,
        "metadata": json_text(metadata, "metadata"),
        "messages": None,
        "score": None,
        "content_hash": digest or content_hash(data),
        "file_size": None,  # the file's signature, filled in by whoever read the file
        "file_mtime_ns": None,
    }


def _guard_result(obj: dict) -> tuple[bool | None, bool, str | None, list | None]:
    gr = obj.get("guard_result")
    loose_feedback = obj.get("feedback")
    if loose_feedback is not None and not isinstance(loose_feedback, str):
        raise ParseError(f"feedback: must be a string, got {kind(loose_feedback)}")
    if gr is None:
        return None, False, loose_feedback, None
    if isinstance(gr, bool):  # legacy: a bare verdict, the feedback beside it
        return gr, False, loose_feedback, None
    if not isinstance(gr, dict):
        raise ParseError(f"guard_result: must be an object or a boolean, got {kind(gr)}")
    passed = gr.get("passed")
    if passed is not None and not isinstance(passed, bool):
        raise ParseError(f"guard_result.passed: must be a boolean, got {kind(passed)}")
    fatal = gr.get("fatal", False)
    if fatal is None:
        fatal = False
    if not isinstance(fatal, bool):
        raise ParseError(f"guard_result.fatal: must be a boolean, got {kind(fatal)}")
    feedback = text(gr, "feedback", where="guard_result.")
    sub = gr.get("sub_results")
    if sub is not None and not isinstance(sub, list):
        raise ParseError(f"guard_result.sub_results: must be an array, got {kind(sub)}")
    return passed, fatal, feedback if feedback is not None else loose_feedback, sub


def _feedback_history(value: Any) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ParseError(f"context.feedback_history: must be an array, got {kind(value)}")
    out = []
    for i, entry in enumerate(value):
        if isinstance(entry, dict):
            aid, fb = entry.get("artifact_id"), entry.get("feedback")
        elif isinstance(entry, list) and len(entry) == 2:  # legacy (id, feedback) pairs
            aid, fb = entry
        else:
            raise ParseError(f"context.feedback_history[{i}]: must be an object with artifact_id and feedback")
        if not isinstance(aid, str) or not isinstance(fb, str):
            raise ParseError(f"context.feedback_history[{i}]: artifact_id and feedback must be strings")
        out.append({"artifact_id": aid, "feedback": fb})
    return out


def _dependencies(value: Any) -> dict | None:
    if value is None:
        return None
    if isinstance(value, list):  # legacy: [action pair id, artifact id] pairs
        for i, pair in enumerate(value):
            # Checked, not left to dict(), which takes any two-item iterable: "ab" as ("a", "b").
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ParseError(
                    f"context.dependency_artifacts[{i}]: must be an [action pair id, artifact id] array of two strings"
                )
        value = dict(value)
    if not isinstance(value, dict):
        raise ParseError(f"context.dependency_artifacts: must be an object, got {kind(value)}")
    return value


# Files per task handed to a parse worker. Each task's result crosses a pipe and is unpickled
# by a thread of the writing process, taking the interpreter from the writer for a moment:
# fewer, bigger tasks disturb it less (measured on 2 CPUs, 20k files: 500 gave a first scan
# ~10 % faster than 250; 1000 no faster than 500, within noise).
CHUNK_FILES = 500


class AtomicGuardSource:
    """Reads one FilesystemArtifactDAG directory.

    Args:
        key: the name under which rows are stored in the buffer.
        root: the store directory (holding objects/ and index.json).
        max_file_bytes: larger files are quarantined unread.
        settle_seconds: a file that does not parse and changed this recently is still being
            written: it is retried on a later scan, not quarantined.
        parse_workers: worker processes that read and parse when a scan meets thousands of
            new files; 0 means two (none on a single CPU), 1 or more that many. Fewer new
            files are read in the scanning process.
    """

    def __init__(
        self,
        key: str,
        root: Path,
        max_file_bytes: int = StoreSettings.max_file_bytes,
        settle_seconds: float = StoreSettings.settle_seconds,
        parse_workers: int = 0,
    ):
        self.key = key
        self.root = Path(root)
        self.abs_root = os.path.abspath(self.root)
        self.real_root = os.path.realpath(self.root)
        self.max_file_bytes = max_file_bytes
        self.settle_seconds = settle_seconds
        self.parse_workers = parse_workers

    def watch_paths(self) -> list[Path]:
        return [self.root]

    def _index(self) -> dict[str, dict]:
        try:
            with open(self.root / "index.json", "rb") as f:
                index = orjson.loads(f.read())
            artifacts = index.get("artifacts", {}) if isinstance(index, dict) else {}
            return artifacts if isinstance(artifacts, dict) else {}
        except (OSError, ValueError):
            return {}  # the index is only a hint; the object files are the truth

    def _walk(self, paths: Iterable[str] | None) -> Iterator[tuple[str, str]]:
        """(locator, absolute path) of candidate artifact files."""
        objects = os.path.join(str(self.root), "objects")
        if paths is not None:
            real_objects = os.path.realpath(objects)
            folders: dict[str, bool] = {}
            for p in paths:
                locator = self._confined(os.fspath(p), real_objects, folders)
                if locator is not None:
                    yield locator, os.path.join(str(self.root), locator)
            return
        try:
            prefixes = sorted(os.scandir(objects), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for prefix in prefixes:
            if not prefix.is_dir(follow_symlinks=False):
                continue
            try:
                entries = sorted(os.scandir(prefix.path), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.name.endswith(".json"):
                    yield f"objects/{prefix.name}/{entry.name}", entry.path

    def _confined(self, path: str, real_objects: str, folders: dict[str, bool]) -> str | None:
        """The locator of an event's path, or None unless it names a file the full scan reads.

        That is ``objects/<prefix>/<name>.json`` reached through real directories of the store:
        a path through a symlinked directory (``ln -s .. objects/zz/loop`` names every artifact
        again, endlessly) or out of the store names nothing. ``objects/`` itself may be a link,
        as for the full scan: ``real_objects`` is where it leads. ``folders`` caches the verdict
        on each prefix folder for one scan.
        """
        rel = os.path.relpath(os.path.abspath(path), self.abs_root)
        parts = rel.split(os.sep)
        if len(parts) != 3 or parts[0] != "objects" or not parts[2].endswith(".json") or parts[1] in ("", ".", ".."):
            return None
        real = folders.get(parts[1])
        if real is None:
            folder = os.path.join(self.abs_root, "objects", parts[1])
            real = folders[parts[1]] = os.path.realpath(folder) == os.path.join(real_objects, parts[1])
        return "/".join(parts) if real else None

    def scan(
        self, buffer: Buffer, batch_size: int = BufferSettings.batch_size, paths: Iterable[str] | None = None
    ) -> Iterator[Batch]:
        """Files seen before are statted and read only if they changed (a rescan is mostly
        that); files never seen are read in chain order, as index.json knows it, so that the
        attempts of a chain land in one batch and are linked once, not once per batch."""
        files: Iterable[tuple[str, str]] = self._walk(paths)
        unmet: set[str] = set()  # quarantine entries a full walk has not met (yet)
        if paths is None:
            known = buffer.file_signatures(self.key)
            unmet = buffer.quarantined_locators(self.key)
        else:  # a few changed paths: only their signatures
            files = list(files)
            known = buffer.file_signatures(
                self.key,
                [
                    name
                    for locator, _ in files
                    for name in ((locator, safe_name(locator)) if _undecodable(locator) else (locator,))
                ],
            )
        out = _Scan(self.key, batch_size, self._index)
        seen: list[_File] = []
        unseen: list[_File] = []
        for locator, path in files:
            last = known.get(locator)
            if last is None and _undecodable(locator):
                last = known.get(safe_name(locator))  # quarantined under its printable name
            if unmet:
                unmet.discard(safe_name(locator) if _undecodable(locator) else locator)
            if last is None:
                unseen.append((locator, path, None))
                continue
            seen.append((locator, path, last))
            if len(seen) >= CHUNK_FILES:  # looked at as the walk goes: a rescan holds little
                yield from self._read(seen, 0, out)
                seen = []
        yield from self._read(seen, 0, out)
        if len(unseen) > batch_size:
            index = out.index()
            unseen.sort(key=_chain_order(index))
        workers = pool.worker_count(self.parse_workers) if len(unseen) >= pool.MIN_PARALLEL_FILES else 0
        yield from self._read(unseen, workers, out)
        # Those of files that no longer exist go (the count in status stops including them).
        out.batch.gone += sorted(loc for loc in unmet if not os.path.lexists(os.path.join(self.root, loc)))
        if len(out.batch) or out.batch.unchanged:
            yield out.take()

    def _read(self, files: list[_File], workers: int, out: _Scan) -> Iterator[Batch]:
        """Look at files in order (in ``workers`` processes, or here with 0) into batches."""
        limits = (self.key, self.real_root, self.max_file_bytes, self.settle_seconds, time.time())
        tasks = [(limits, chunk) for chunk in pool.chunked(files, CHUNK_FILES)]
        # The first batch is read here while the workers start; they stay three batches ahead:
        # the writer takes a batch's worth at once, then commits it while they go on
        # (measured: with two chunks ahead they sat idle half the time).
        per_batch = max(1, out.batch_size // CHUNK_FILES)
        for outcomes, unchanged in pool.ordered_map(
            read_files, tasks, workers, __name__, ahead=3 * per_batch, head=per_batch
        ):
            batch = out.batch
            batch.unchanged += unchanged
            for outcome in outcomes:
                if isinstance(outcome, dict):
                    if not outcome["workflow_id"]:  # older library versions kept it only in the index
                        outcome["workflow_id"] = _indexed_workflow(out.index(), outcome["locator"]) or ""
                    batch.artifacts.append(outcome)
                elif isinstance(outcome, Quarantined):
                    batch.quarantined.append(outcome)
                elif isinstance(outcome, Gone):
                    batch.gone.append(outcome.locator)
                else:  # touched, same content
                    batch.touched.append(outcome)
                    batch.unchanged += 1
                if len(batch) >= out.batch_size:
                    yield out.take()
                    batch = out.batch


# A file to look at: (locator, path, (size, mtime_ns, hash) when last handled, or None).
_File = tuple[str, str, "tuple[int, int, str] | None"]
# What looking at a file gave: its row (with the file's signature), why it is quarantined,
# (locator, size, mtime_ns, hash) for a file touched without changing, or Gone for a file
# handled before that is not there any more. A file unchanged since last time, still being
# written, or never seen and gone already gives nothing.
_Outcome: TypeAlias = "dict | Quarantined | Gone | tuple[str, int, int, str]"


def read_files(task: tuple[tuple, Sequence[_File]]) -> tuple[list[_Outcome], int]:
    """Stat, read, hash and parse a chunk of files. Pure, so a parse worker can run it.

    Returns:
        The outcomes in order, and how many files were unchanged since last handled.
    """
    (key, real_root, max_file_bytes, settle_seconds, now), files = task
    outcomes: list[_Outcome] = []
    unchanged = 0
    for locator, path, last in files:
        fd = None
        try:
            refused = None
            if last is None and not _undecodable(locator):
                # Never seen: opened first, which saves a lookup of the path; a symlink
                # refuses to open this way and is looked at below.
                fd = _open_unless_symlink(path)
            if fd is not None:
                st = os.fstat(fd)
            else:
                st = os.stat(path, follow_symlinks=False)
                if _undecodable(locator):
                    locator, refused = safe_name(locator), "file name is not valid UTF-8"
                elif stat.S_ISLNK(st.st_mode):
                    target = os.path.realpath(path)
                    if os.path.commonpath([target, real_root]) != real_root:
                        refused = f"symlink leads outside the store (to {target})"
                    elif _is_object_file(os.path.relpath(target, real_root)):
                        # Another artifact file: read there, so that it is stored once.
                        refused = f"symlink to {os.path.relpath(target, real_root)}, which is read as itself"
                    else:
                        st = os.stat(path)
                if last and last[0] == st.st_size and last[1] == st.st_mtime_ns:
                    unchanged += 1
                    continue
            if refused is None and not stat.S_ISREG(st.st_mode):
                refused = "not a regular file"
            if refused is None and st.st_size > max_file_bytes:
                refused = f"file is {st.st_size} bytes, over the {max_file_bytes}-byte limit"
            if refused is not None:  # quarantined unread, until the file changes
                outcomes.append(Quarantined(key, locator, refused, None, st.st_size, st.st_mtime_ns))
                continue
            if fd is None:
                fd = _open(path)
            data = _read(fd, st.st_size, max_file_bytes)
        except FileNotFoundError:  # removed since listed, or a watcher's delete event
            if last is not None:  # its quarantine entry, if it has one, goes
                outcomes.append(Gone(safe_name(locator) if _undecodable(locator) else locator))
            continue
        except OSError as e:  # tried again on the next scan
            outcomes.append(Quarantined(key, locator, f"cannot read: {e.strerror}"))
            continue
        finally:
            if fd is not None:
                os.close(fd)
        digest = content_hash(data)
        if last and digest == last[2]:
            outcomes.append((locator, st.st_size, st.st_mtime_ns, digest))
            continue
        try:
            row = parse_artifact(data, source=key, locator=locator, digest=digest)
        except ParseError as e:
            if now - st.st_mtime_ns / 1e9 < settle_seconds:
                continue  # probably still being written: look again on the next scan
            outcomes.append(Quarantined(key, locator, str(e), digest, len(data), st.st_mtime_ns))
        else:
            row["file_size"], row["file_mtime_ns"] = st.st_size, st.st_mtime_ns
            outcomes.append(row)
    return outcomes, unchanged


class _Scan:
    """One scan's state: the batch being filled (a fresh one each time it is taken), and
    index.json, read at most once per scan and only when needed."""

    def __init__(self, key: str, batch_size: int, load_index: Callable[[], dict[str, dict]]):
        self.key, self.batch_size = key, batch_size
        self.batch = Batch(key)
        self._load_index = load_index
        self._index: dict[str, dict] | None = None

    def index(self) -> dict[str, dict]:
        if self._index is None:
            self._index = self._load_index()
        return self._index

    def take(self) -> Batch:
        batch, self.batch = self.batch, Batch(self.key)
        return batch


def _artifact_id(locator: str) -> str:
    """The artifact id an object file is named after (its stem): index.json's key for it."""
    return locator[locator.rfind("/") + 1 : -5]


def _index_entry(index: dict[str, dict], locator: str) -> dict | None:
    """index.json's entry for an artifact file."""
    entry = index.get(_artifact_id(locator))
    return entry if type(entry) is dict else None


def _indexed_workflow(index: dict[str, dict], locator: str) -> str | None:
    workflow_id = (_index_entry(index, locator) or {}).get("workflow_id")
    return workflow_id if isinstance(workflow_id, str) else None


def _chain_order(index: dict[str, dict]) -> Callable[[_File], str]:
    """A sort key putting files in workflow and action pair order, as index.json has them;
    unknown files last.

    (A stable sort keeps the walk's order inside a group; linking does not need time order.)
    Each entry's key is made once, up front: a third faster than looking it up per file.
    """
    groups = {
        artifact_id: f"{entry.get('workflow_id')}\0{entry.get('action_pair_id')}"
        for artifact_id, entry in index.items()
        if type(entry) is dict
    }
    unknown = "\U0010ffff"

    def key(item: _File) -> str:
        return groups.get(_artifact_id(item[0]), unknown)

    return key


def _open(path: str, flags: int = 0) -> int:
    """A file descriptor to read ``path`` (never blocking on a FIFO)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | flags)


def _open_unless_symlink(path: str) -> int | None:
    """:func:`_open`, or None where ``path`` is a symlink (O_NOFOLLOW)."""
    try:
        return _open(path, os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        raise


def _read(fd: int, size: int, limit: int) -> bytes:
    data = os.read(fd, min(size, limit) + 1)
    if len(data) > size:  # grew since stat: take the rest, up to the limit
        while len(data) <= limit:
            more = os.read(fd, limit + 1 - len(data))
            if not more:
                break
            data += more
    return data


def _is_object_file(rel: str) -> bool:
    """Whether a path relative to the store is where an artifact file lives (objects/xx/name.json)."""
    parts = rel.split(os.sep)
    return len(parts) == 3 and parts[0] == "objects" and parts[2].endswith(".json")


def _undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True
