"""Fixtures for the crash and fault suite: the daemon suite's (a private store, `lorad serve`
subprocesses stopped at the end, a tiny model, a leak check on threads and child processes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "daemon"))  # daemon_helpers, daemon_fixtures

from daemon_fixtures import _no_leaks, daemon_factory, short_root, store, tiny_model  # noqa: E402,F401
