"""structlog, configured once at start-up.

Under systemd (stdout is not a TTY) every event is one JSON line, which journald keeps as is;
on a terminal a console renderer is easier to read. Event names are snake_case verbs in the
past tense: ``artifact_quarantined``, ``adapter_promoted``.
"""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream=None) -> None:
    """Configure structlog for the whole process.

    Args:
        level: debug, info, warning or error.
        fmt: "json", "console", or "auto" (console on a TTY, JSON otherwise).
        stream: where events go; stdout by default (journald reads it under systemd).
    """
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(name: str | None = None):
    return structlog.get_logger(name) if name else structlog.get_logger()
