"""Fixtures shared across the suite."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _reset_structlog():
    """`lorad.cli.main()` run in-process points structlog at pytest's captured streams; undo it."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture
def fixture_store(tmp_path) -> Path:
    """A private copy of the real AtomicGuard store (40 tasks, 102 artifacts)."""
    dest = tmp_path / "store"
    shutil.copytree(FIXTURES / "atomicguard-store", dest)
    return dest


@pytest.fixture
def buffer(tmp_path):
    """A fresh, migrated buffer on disk."""
    from lorad.buffer.store import Buffer

    with Buffer(tmp_path / "state" / "buffer.sqlite3") as b:
        yield b
