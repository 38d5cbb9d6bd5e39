"""Command groups of the `lorad` CLI, one module each (see :mod:`lorad.cli`)."""

from __future__ import annotations

import json
import sys


class CommandError(Exception):
    "A command failed in a way the user can act on; the message says how."

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def emit(args, payload, text: str | None = None) -> None:
    """Print ``payload`` as JSON under --json, else ``text`` (or the payload's JSON)."""
    if args.json or text is None:
        json.dump(payload, sys.stdout, indent=None if args.json else 2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
