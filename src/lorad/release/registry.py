"""Adapter versions on disk: immutable, checksummed, with atomically swapped pointers.

Layout of ``state_dir/adapters/``::

    v0007-20261121T031502Z/     one version: the adapter files + lorad.json, read-only
    current -> v0007-…          the adapter serving now (a relative symlink)
    previous -> v0005-…         the blessed version before it (the default rollback target)
    pointers.jsonl              appended: every pointer change (promote, rollback, revert, each
                                logged before the links move) and each version's lorad.json sha256
    .sequence                   the last version number handed out (names are never reused)
    .lock                       flock held by whoever changes the registry

A version is written under a temporary name, fsynced and renamed into place, so it exists
whole or not at all; after that nothing in it changes. ``lorad.json`` records the base
model, the method and hyperparameters, the parent version, a hash and count of the examples
trained on (and the buffer's max seq at snapshot time), the metrics, the gate's verdict and
the sha256 of every other file. Every candidate that finished training becomes a version —
rejected ones too, so one can be promoted by hand later — and the verdict says which it was.

Pointers move by writing a new symlink and renaming it over the old one (atomic on POSIX).
Promotion and rollback refuse a version whose files no longer match their sha256, or whose
lorad.json no longer matches the digest the pointer log kept when it was made (versions made
before that digest existed are checked by their files only).

A pointer is believed only when it is a relative link to a version directory here that is
where the pointer log put it. Otherwise ``current()``/``previous()`` return None,
``registry_pointer_refused`` is logged once, ``pointer_problems()`` says why, rollback
refuses, and promoting a version by name repairs it (its hooks hear of the version the log
last made current, not ""). A sound link to a version whose files fail verification is
named, logged and listed the same way; what would use its files refuses it (prepare,
promote, rollback to it), and rolling back away from it works.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from lorad import durable, events
from lorad.config import RegistrySettings

log = structlog.get_logger()

RECORD = "lorad.json"
POINTER_LOG = "pointers.jsonl"
VERSION_RE = re.compile(r"^v(\d{4,})-(\d{8}T\d{6}Z)$", re.ASCII)  # ASCII: int() takes "٣", not "²"


def version_number(name: str) -> int:
    """The N of a version name ``vNNNN-<time>``.

    Raises:
        ValueError: ``name`` is not a version name.
    """
    m = VERSION_RE.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a version name")
    return int(m.group(1))


POINTER_ACTIONS = ("promoted", "rolled_back", "reverted")
POINTERS = ("current", "previous")

Audit = Callable[..., None]


class RegistryError(Exception):
    "The registry cannot do what was asked; the message says why."


class UnknownVersion(RegistryError):
    "No such adapter version."


class TamperedVersion(RegistryError):
    "A version's files no longer match the sha256 recorded in its lorad.json."


@dataclass(frozen=True)
class Version:
    """One adapter version: its name, directory and lorad.json."""

    name: str
    path: Path
    record: dict = field(repr=False)

    @property
    def number(self) -> int:
        return version_number(self.name)

    @property
    def verdict(self) -> dict:
        return self.record.get("verdict") or {}

    @property
    def nll(self) -> float | None:
        return ((self.record.get("metrics") or {}).get("candidate") or {}).get("nll")


@dataclass(frozen=True)
class Change:
    """A pointer change: what ``current`` and ``previous`` were before and are now."""

    action: str  # promoted | rolled_back | reverted
    version: str | None  # the new current
    replaced: str | None  # the old current
    previous: str | None  # the new previous
    before: tuple[str | None, str | None]  # (current, previous) before the change
    reason: str = ""

    def as_dict(self) -> dict:
        return {
            "action": self.action,
            "version": self.version,
            "replaced": self.replaced,
            "previous": self.previous,
            "before": list(self.before),
            "reason": self.reason,
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def version_name(number: int, now: datetime) -> str:
    return f"v{number:04d}-{now.astimezone(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


class Registry:
    """The adapter versions under ``root`` (``state_dir/adapters``).

    Args:
        root: the adapters directory (created when first written).
        keep: besides the active and previous versions, keep this many newest ones.
        keep_best: also keep the version with the lowest held-out loss among the promoted.
        audit: called as ``audit(event, version=..., **detail)`` for every promotion,
            rollback and revert (``Buffer.record_event`` fits); None = no audit trail.
    """

    def __init__(
        self,
        root: str | Path,
        keep: int = RegistrySettings.keep,
        keep_best: bool = RegistrySettings.keep_best,
        audit: Audit | None = None,
    ):
        self.root = Path(root)
        self.keep = keep
        self.keep_best = keep_best
        self.audit = audit
        self._holding = False  # this instance holds the registry lock (no shared lock then)
        # Caches of what is slow to read and cheap to check: the daemon keeps one Registry and
        # reads its pointers twice a second. Each entry is used only while its file signature holds.
        self._verified: dict[str, tuple[tuple, list[str]]] = {}  # version dir -> (signature, problems)
        self._warned: set[str] = set()  # pointer problems already logged
        self._log_cache: tuple[tuple, list[dict]] | None = None  # pointers.jsonl (stat signature, entries)

    # -- reading --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Version names, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if VERSION_RE.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda n: version_number(n))

    def get(self, name: str) -> Version:
        """A version by name (or by its number alone: "v0007" or "7").

        Raises:
            UnknownVersion: there is no such version.
        """
        name = self.resolve(name)
        path = self.root / name
        try:
            record = json.loads((path / RECORD).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UnknownVersion(f"version {name} has no {RECORD}") from None
        except json.JSONDecodeError as e:
            raise TamperedVersion(f"version {name}: {RECORD} is not valid JSON: {e}") from None
        return Version(name, path, record)

    def resolve(self, name: str) -> str:
        names = self.names()
        if name in names:
            return name
        digits = name.lstrip("v")
        # ASCII digits only: "²".isdigit() is true, and int("²") raises; a number longer than
        # any version's is none of them (and int() refuses 4,300 digits).
        if digits.isascii() and digits.isdigit() and len(digits) <= 18:
            for n in names:
                if version_number(n) == int(digits):
                    return n
        raise UnknownVersion(f"no adapter version {name!r} in {self.root}")

    def versions(self) -> list[Version]:
        return [self.get(n) for n in self.names()]

    def current(self) -> str | None:
        return self._pointer("current")

    def previous(self) -> str | None:
        return self._pointer("previous")

    def path_of(self, name: str | None) -> Path | None:
        return self.root / name if name else None

    def _pointer(self, which: str) -> str | None:
        name, problem = self._read_pointer(which)
        if problem and problem not in self._warned:
            self._warned.add(problem)
            log.warning(events.REGISTRY_POINTER_REFUSED, registry=str(self.root), pointer=which, problem=problem)
        return name

    def pointer_problems(self) -> list[str]:
        """Why ``current`` or ``previous`` is not believed (empty when both are sound)."""
        return [problem for which in POINTERS if (problem := self._read_pointer(which)[1])]

    def _read_pointer(self, which: str) -> tuple[str | None, str | None]:
        """(name, None) for a sound pointer, (None, why) for a bent link, (None, None) for none.

        A sound link to a version whose files fail verification gives (name, why): callers
        that use the files refuse it (prepare, promote, rollback) and rolling back away from
        it must stay possible.
        """
        found = self._read_pointer_once(which)
        if found[1] and "pointer log says" in found[1] and not self._holding:
            # A change is logged just before its links move: look again once it is done.
            try:
                with open(self.root / ".lock") as f:
                    fcntl.flock(f, fcntl.LOCK_SH)
                    found = self._read_pointer_once(which)
            except OSError:
                pass
        return found

    def _read_pointer_once(self, which: str) -> tuple[str | None, str | None]:
        link = self.root / which
        logged = self._logged()
        if not link.is_symlink():
            if link.exists():
                return None, f"{which} is not a symlink"
            expected = logged.get(which)
            return None, (f"{which} is missing; the pointer log says {expected}" if expected else None)
        target = os.readlink(link)
        if "/" in target or not VERSION_RE.match(target):
            return None, f"{which} points at {target}, outside the registry"
        if not (self.root / target).is_dir():
            return None, f"{which} points at {target}, which does not exist"
        if logged and target != logged[which]:
            return None, (
                f"{which} points at {target}, but the pointer log says {logged[which]}: "
                "changed outside lorad (or lorad was killed while moving it)"
            )
        problems = self._verify_cached(target)
        if problems:
            return target, f"{which} points at {target}, which fails verification: {problems[0]}"
        return target, None

    def _logged(self) -> dict:
        """Where the pointer log's last change put the pointers: {} when it has none."""
        changes = self.pointer_log()
        if not changes:
            return {}
        return {"current": changes[-1].get("version"), "previous": changes[-1].get("previous")}

    def _verify_cached(self, name: str) -> list[str]:
        """verify(), skipped while no file of the version changed (status reads pointers twice a second)."""
        path = self.root / name
        files: tuple | None
        try:
            files = tuple(
                sorted(
                    (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                    for p in path.rglob("*")
                    if (st := p.stat()) and p.is_file()
                )
            )
        except OSError:
            files = None
        signature = (files, self.record_digest(name))
        cached = self._verified.get(str(path))
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            problems = self.verify(name)
        except RegistryError as e:
            problems = [str(e)]
        self._verified[str(path)] = (signature, problems)
        return problems

    def made(self) -> set[str]:
        """Every version this registry created, pruned ones included (pointers.jsonl's "created"
        entries; versions made before those entries existed are not among them)."""
        return {
            e["version"]
            for e in self.pointer_log(all_entries=True)
            if e.get("action") == "created" and isinstance(e.get("version"), str)
        }

    def record_digest(self, name: str) -> str | None:
        """The sha256 of ``name``'s lorad.json as logged when it was made (None before digests)."""
        digest = None
        for e in self.pointer_log(all_entries=True):
            if e.get("action") == "created" and e.get("version") == name:
                digest = e.get("record_sha256")
        return digest

    def record_ok(self, name: str) -> bool:
        """lorad.json still matches the digest logged when the version was made (True before digests)."""
        digest = self.record_digest(name)
        return digest is None or sha256_file(self.root / name / RECORD) == digest

    def verify(self, name: str) -> list[str]:
        """Problems with a version's files and lorad.json (empty when every sha256 matches)."""
        version = self.get(name)
        files = version.record.get("files")
        if not isinstance(files, dict) or not files:
            return [f"{RECORD} lists no files with their sha256"]
        problems = []
        digest = self.record_digest(version.name)
        if digest is not None and sha256_file(version.path / RECORD) != digest:
            problems.append(f"{RECORD}: sha256 does not match the digest recorded when the version was made")
        for rel, digest in sorted(files.items()):
            p = version.path / rel
            if not p.is_file():
                problems.append(f"{rel}: missing")
            elif sha256_file(p) != digest:
                problems.append(f"{rel}: sha256 does not match {RECORD}")
        present = {str(p.relative_to(version.path)) for p in version.path.rglob("*") if p.is_file()}
        for extra in sorted(present - set(files) - {RECORD}):
            problems.append(f"{extra}: not listed in {RECORD}")
        return problems

    def pointer_log(self, all_entries: bool = False) -> list[dict]:
        """The pointer changes, oldest first (with ``all_entries``, the versions' digests too)."""
        path = self.root / POINTER_LOG
        try:
            st = path.stat()
            cached = self._log_cache
            if cached is not None and cached[0] == (st.st_size, st.st_mtime_ns, st.st_ino):
                entries = cached[1]
            else:
                entries = []
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a torn last line (a crash while appending)
                        continue
                    if isinstance(entry, dict):
                        entries.append(entry)
                self._log_cache = ((st.st_size, st.st_mtime_ns, st.st_ino), entries)
        except FileNotFoundError:
            return []
        return [dict(e) for e in entries if all_entries or e.get("action") in POINTER_ACTIONS]

    # -- writing --------------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            self._holding = True
            try:
                yield
            finally:
                self._holding = False
                fcntl.flock(f, fcntl.LOCK_UN)

    def create(self, adapter_dir: str | Path, record: dict[str, Any], now: datetime | None = None) -> Version:
        """Store the files of ``adapter_dir`` as a new immutable version.

        Args:
            adapter_dir: the trained adapter (adapter_config.json, adapter_model.safetensors…).
            record: what lorad.json should say besides version, created_at and files
                (base_model, method, hyperparameters, parent, examples, metrics, verdict…).
            now: the creation time (the name's timestamp); default the current time.

        Returns:
            The new Version.
        """
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise RegistryError(f"no adapter directory at {adapter_dir}")
        now = now or datetime.now(timezone.utc)
        with self._locked():
            number = self._next_number()
            name = version_name(number, now)
            tmp = self.root / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(adapter_dir, tmp)
            (tmp / RECORD).unlink(missing_ok=True)
            files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            full = dict(record) | {
                "version": name,
                "created_at": now.astimezone(timezone.utc).isoformat(timespec="seconds"),
                "files": files,
            }
            (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str) + "\n", encoding="utf-8")
            for p in tmp.rglob("*"):
                if p.is_file():
                    durable.fsync(p)
                    p.chmod(0o440)  # read-only; the group (lorad) may read, others not
            durable.fsync(tmp)
            # lorad.json's own digest, kept outside the version (which holds the other digests)
            self._append(
                {"ts": time.time(), "action": "created", "version": name, "record_sha256": sha256_file(tmp / RECORD)}
            )
            os.rename(tmp, self.root / name)
            durable.fsync(self.root)
        return self.get(name)

    def _next_number(self) -> int:
        seq_file = self.root / ".sequence"
        try:
            last = int(seq_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            last = 0
        for n in self.names():
            last = max(last, version_number(n))
        seq_file.write_text(f"{last + 1}\n")
        return last + 1

    def promote(self, name: str, reason: str = "", **detail: Any) -> Change:
        """Make ``name`` current; the old current becomes previous.

        Raises:
            UnknownVersion: no such version.
            TamperedVersion: its files fail their sha256; nothing changes.
        """
        with self._locked():
            name = self.resolve(name)
            self._check(name)
            cur, prev = self.current(), self.previous()
            if cur == name:
                raise RegistryError(f"{name} is already the current version")
            # A refused current is replaced; the hooks hear of the version the log last made current.
            replaced = cur if cur is not None else self._logged().get("current")
            sound = replaced is not None and replaced != name and (self.root / replaced).is_dir()
            new_prev = replaced if sound else prev
            change = Change("promoted", name, replaced, new_prev, (cur, prev), reason)
            self._log(change)
            self._set_pointers(name, new_prev)
        self._audit("adapter_promoted", change, detail)
        return change

    def rollback(self, name: str | None = None, reason: str = "", **detail: Any) -> Change:
        """Make ``name`` (default: the previous blessed version) current again.

        ``previous`` then points at the version that was current before ``name`` was last
        made current, so repeated rollbacks walk back through the blessed history.

        Raises:
            RegistryError: there is no previous version to roll back to.
            UnknownVersion, TamperedVersion: as for :meth:`promote`.
        """
        with self._locked():
            for which in POINTERS:
                found, problem = self._read_pointer(which)
                if problem and found is None and (which == "current" or not name):
                    raise RegistryError(
                        f"refusing to roll back: {problem}; promote a version by name "
                        "(lorad promote VERSION) to repair the pointers"
                    )
            cur, prev = self.current(), self.previous()
            target = self.resolve(name) if name else prev
            if target is None:
                raise RegistryError("there is no previous version to roll back to")
            if target == cur:
                raise RegistryError(f"{target} is already the current version")
            self._check(target)
            new_prev = self._blessed_before(target, exclude={cur, target})
            change = Change("rolled_back", target, cur, new_prev, (cur, prev), reason)
            self._log(change)
            self._set_pointers(target, new_prev)
        self._audit("adapter_rolled_back", change, detail)
        return change

    def revert(self, change: Change, reason: str = "", **detail: Any) -> Change:
        """Put both pointers back to where they were before ``change`` (a failed required hook)."""
        with self._locked():
            cur, prev = self.current(), self.previous()
            undo = Change("reverted", change.before[0], cur, change.before[1], (cur, prev), reason)
            self._log(undo)
            self._set_pointers(*change.before)
        self._audit("adapter_change_reverted", undo, detail | {"undone": change.as_dict()})
        return undo

    def _check(self, name: str) -> None:
        problems = self.verify(name)
        if problems:
            raise TamperedVersion(f"refusing {name}: " + "; ".join(problems))

    def _blessed_before(self, target: str, exclude: set) -> str | None:
        """The version that was current just before ``target`` last became current."""
        for entry in reversed(self.pointer_log()):
            if entry.get("version") == target:
                candidate = entry.get("previous")
                if candidate and candidate not in exclude and (self.root / candidate).is_dir():
                    return candidate
                return None
        return None

    def _set_pointers(self, current: str | None, previous: str | None) -> None:
        # previous first: a crash in between leaves current as it was, never dangling.
        self._swap("previous", previous)
        self._swap("current", current)
        durable.fsync(self.root)

    def _swap(self, which: str, target: str | None) -> None:
        link = self.root / which
        if target is None:
            link.unlink(missing_ok=True)
            return
        tmp = self.root / f".{which}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def _log(self, change: Change) -> None:
        self._append({"ts": time.time()} | change.as_dict())

    def _append(self, entry: dict) -> None:
        with open(self.root / POINTER_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _audit(self, event: str, change: Change, detail: dict) -> None:
        if self.audit is not None:
            self.audit(
                event,
                version=change.version,
                replaced=change.replaced,
                previous=change.previous,
                reason=change.reason,
                **detail,
            )

    # -- retention ------------------------------------------------------------------------------

    def retained(self) -> set[str]:
        """The versions pruning keeps: current, previous, the newest ``keep``, and the best."""
        names = self.names()
        keep = set(names[-self.keep :]) if self.keep > 0 else set()
        keep |= {n for n in (self.current(), self.previous()) if n}
        # and what a bent pointer still names, or the log says: a repair may need them
        keep |= {n for n in self._logged().values() if n}
        for which in POINTERS:
            try:
                keep.add(os.readlink(self.root / which))
            except OSError:
                pass
        if self.keep_best:
            best = self.best()
            if best:
                keep.add(best)
        return keep

    def best(self) -> str | None:
        """The promoted-by-the-gate version with the lowest held-out loss."""
        scored = []
        for v in self.versions():
            if v.verdict.get("promote") and isinstance(v.nll, (int, float)):
                scored.append((v.nll, v.number, v.name))
        return min(scored)[2] if scored else None

    def prune(self) -> list[str]:
        """Delete every version not retained (and stale temporary directories). Returns their names."""
        removed = []
        with self._locked():
            keep = self.retained()
            for name in self.names():
                if name not in keep:
                    _remove_tree(self.root / name)
                    removed.append(name)
            for tmp in self.root.glob(".tmp-*"):
                _remove_tree(tmp)
        return removed


def _remove_tree(path: Path) -> None:
    # Versions are read-only; make them writable just long enough to delete them.
    for p in path.rglob("*"):
        if p.is_dir():
            p.chmod(0o755)
    path.chmod(0o755)
    shutil.rmtree(path)
