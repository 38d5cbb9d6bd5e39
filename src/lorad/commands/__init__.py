"""Command groups of the `lorad` CLI, one module each (see :mod:`lorad.cli`)."""

from __future__ import annotations

import json
import sys


def emit(args, payload, text: str | None = None) -> None:
    """Print ``payload`` as JSON under --json, else ``text`` (or the payload's JSON)."""
    if args.json or text is None:
        json.dump(payload, sys.stdout, indent=None if args.json else 2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
