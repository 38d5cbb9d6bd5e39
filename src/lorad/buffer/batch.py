"""What a source reader hands to the buffer: one batch of rows and quarantined inputs.

Kept apart from :mod:`lorad.buffer.store` so that readers, and the worker processes that
parse for them, import no database code.
"""

from __future__ import annotations


class Quarantined:
    """One input that could not be read, and why.

    A quarantined file with ``mtime_ns`` is not read again until its size or mtime changes;
    one without (it could not be read at all) is tried again on the next scan.
    """

    __slots__ = ("source", "locator", "reason", "content_hash", "size", "mtime_ns")

    def __init__(self, source: str, locator: str, reason: str, content_hash: str | None = None,
                 size: int | None = None, mtime_ns: int | None = None):
        self.source, self.locator, self.reason = source, locator, reason
        self.content_hash, self.size, self.mtime_ns = content_hash, size, mtime_ns

    def __repr__(self):
        return f"Quarantined({self.locator!r}: {self.reason})"

    def __reduce__(self):  # pickled by the parse workers
        return Quarantined, (self.source, self.locator, self.reason, self.content_hash, self.size, self.mtime_ns)


class Batch:
    """What one ingest step writes in a single transaction.

    A row read from a file carries the file's signature in ``file_size`` and ``file_mtime_ns``
    (beside the artifact columns), so a rescan skips the file while it stays the same.
    """

    def __init__(self, source: str):
        self.source = source
        self.artifacts: list[dict] = []
        self.quarantined: list[Quarantined] = []
        self.touched: list[tuple[str, int, int, str]] = []  # (locator, size, mtime_ns, hash): same content
        self.state: dict | None = None
        self.unchanged = 0  # inputs seen and skipped because nothing changed

    def __len__(self):
        """Inputs in the batch (what ``batch_size`` limits)."""
        return len(self.artifacts) + len(self.quarantined) + len(self.touched)

    def signatures(self) -> list[tuple[str, str, int, int, str]]:
        """(source, locator, size, mtime_ns, hash) of every file this batch has handled."""
        out = [(self.source, row["locator"], row["file_size"], row["file_mtime_ns"], row["content_hash"])
               for row in self.artifacts if row.get("file_mtime_ns") is not None]
        out += [(self.source, q.locator, q.size, q.mtime_ns, q.content_hash or "-")
                for q in self.quarantined if q.mtime_ns is not None]
        out += [(self.source, *t) for t in self.touched]
        return out
