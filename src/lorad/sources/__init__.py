"""Readers of artifact stores, one module each, all with the interface of :class:`base.Reader`."""

from __future__ import annotations

from lorad.config import SourceSettings, StoreSettings
from lorad.sources.atomicguard import AtomicGuardSource
from lorad.sources.base import ParseError, Reader
from lorad.sources.jsonl import JsonlSource

__all__ = ["AtomicGuardSource", "JsonlSource", "ParseError", "Reader", "open_source", "open_sources"]


def open_source(source: SourceSettings, store: StoreSettings | None = None) -> Reader:
    store = store or StoreSettings()
    if source.kind == "atomicguard":
        return AtomicGuardSource(
            source.key, source.path, store.max_file_bytes, store.settle_seconds, store.parse_workers
        )
    return JsonlSource(source.key, source.path, source.score_threshold, store.max_file_bytes)


def open_sources(store: StoreSettings) -> list[Reader]:
    return [open_source(s, store) for s in store.sources]
