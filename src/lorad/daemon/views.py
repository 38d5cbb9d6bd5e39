"""What the daemon reads for its answers: thin read-only wrappers over the buffer and the
registry, kept out of :mod:`lorad.daemon.service` so the service reads as a loop. (Its writes
are elsewhere: feedback in :mod:`lorad.daemon.feedback`, version changes in
:mod:`lorad.release`.) Nothing here imports torch.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

from lorad import events
from lorad.buffer.store import Buffer

log = structlog.get_logger()

def active_version(state_dir: Path) -> str | None:
    """The name ``adapters/current`` points at (a readlink; no lock, no file reads)."""
    from lorad.release.registry import Registry

    return Registry(Path(state_dir) / "adapters").current()


def registry_problems(state_dir: Path) -> list[str]:
    """Why ``current`` or ``previous`` is not believed (a pointer bent outside lorad); empty when sound."""
    from lorad.release.registry import Registry

    return Registry(Path(state_dir) / "adapters").pointer_problems()


def buffer_counts(reader: Buffer, state_dir: Path | None = None) -> dict:
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
        if state_dir is not None:
            from lorad.release.registry import Registry
            from lorad.release import since_seq, trained_seq

            registry = Registry(Path(state_dir) / "adapters")
            counts["new_examples"] = examples.count_new(reader, since_seq(registry))
            counts["untrained_examples"] = examples.count_new(reader, trained_seq(registry))
    except sqlite3.Error as e:  # e.g. a table not migrated yet by the writer: report zeros
        log.debug(events.EXAMPLE_COUNTS_FAILED, error=str(e))
    return counts
