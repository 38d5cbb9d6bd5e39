"""Daemon fixtures (shared with the fault suite): see daemon_fixtures.py."""

from daemon_fixtures import _no_leaks, daemon_factory, short_root, store, tiny_model  # noqa: F401
