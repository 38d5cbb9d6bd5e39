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

    def __init__(
        self,
        source: str,
        locator: str,
        reason: str,
        content_hash: str | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
    ):
        self.source, self.locator, self.reason = source, locator, reason
        self.content_hash, self.size, self.mtime_ns = content_hash, size, mtime_ns

    def __repr__(self):
        return f"Quarantined({self.locator!r}: {self.reason})"

    def __reduce__(self):  # pickled by the parse workers
        return Quarantined, (self.source, self.locator, self.reason, self.content_hash, self.size, self.mtime_ns)


class Gone:
    """A file known before (as an artifact or a quarantine entry) that no longer exists."""

    __slots__ = ("locator",)

    def __init__(self, locator: str):
        self.locator = locator

    def __repr__(self):
        return f"Gone({self.locator!r})"

    def __reduce__(self):  # pickled by the parse workers
        return Gone, (self.locator,)


class Batch:
    """What one ingest step writes in a single transaction.

    A row read from a file carries the file's signature in ``file_size`` and ``file_mtime_ns``
    (None for rows that are not a file of their own, such as JSONL lines), and a quarantined
    file in its ``size`` and ``mtime_ns``: stored with them, they let a rescan skip the file
    while it stays the same.
    """

    def __init__(self, source: str):
        self.source = source
        self.artifacts: list[dict] = []
        self.quarantined: list[Quarantined] = []
        self.touched: list[tuple[str, int, int, str]] = []  # (locator, size, mtime_ns, hash): same content
        # Locators whose files no longer exist: their quarantine entries go (an artifact's row
        # stays: the training data outlives its file).
        self.gone: list[str] = []
        self.state: dict | None = None
        self.unchanged = 0  # inputs seen and skipped because nothing changed

    def __len__(self):
        """Inputs in the batch (what ``batch_size`` limits)."""
        return len(self.artifacts) + len(self.quarantined) + len(self.touched) + len(self.gone)
