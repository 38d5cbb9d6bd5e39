"""What the daemon reads for its answers: thin read-only wrappers over the buffer and the
daemon's registry, kept out of :mod:`lorad.daemon.service` so the service reads as a loop. (Its writes
are elsewhere: feedback in :mod:`lorad.daemon.feedback`, version changes in
:mod:`lorad.release`.) Nothing here imports torch.
"""

from __future__ import annotations

import sqlite3

import structlog

from lorad import events
from lorad.buffer.store import Buffer
from lorad.release.registry import Registry

log = structlog.get_logger()


def buffer_counts(reader: Buffer, registry: Registry | None = None) -> dict:
    """Headline counts for ``lorad status``, from a read-only connection.

    ``new_examples`` counts training examples since the active version's snapshot (what
    status shows); ``untrained_examples`` those since the newest version of any verdict,
    which is what the scheduler waits for: a rejected candidate is not retrained on the
    same data at the next tick.
    """
    from lorad.buffer import examples

    counts = {"examples": 0, "new_examples": 0, "untrained_examples": 0}
    try:
        counts |= reader.counts() | examples.counts(reader)
        if registry is not None:
            from lorad.release import since_seq, trained_seq

            counts["new_examples"] = examples.count_new(reader, since_seq(registry))
            counts["untrained_examples"] = examples.count_new(reader, trained_seq(registry))
    except sqlite3.Error as e:  # e.g. a table not migrated yet by the writer: report zeros
        log.debug(events.EXAMPLE_COUNTS_FAILED, error=str(e))
    return counts
