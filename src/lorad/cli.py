"""The `lorad` command: argument parsing and exit codes, nothing else.

Each command group lives in a module of :mod:`lorad.commands` with a ``register(subparsers)``
function; a handler takes the parsed arguments and the loaded settings, calls one library
function (or sends one request to the daemon), prints, and returns an exit code. Library
errors become a message on stderr and a non-zero exit: 78 (EX_CONFIG) for configuration
errors, which systemd's RestartPreventExitStatus knows not to retry.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorad import __version__
from lorad.commands import CommandError
from lorad.config import EX_CONFIG, ConfigError

# Modules under lorad.commands, in the order their commands appear in --help.
COMMAND_MODULES = (
    "ingest",
    "export",
    "serve",
    "client",
    "report",
    "train",
    "versions",
    "export_adapter",
    "doctor",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    def options(default):
        # Accepted before and after the command; SUPPRESS keeps a subcommand from resetting a
        # value given before it.
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument(
            "--config",
            metavar="PATH",
            default=default(None),
            help="config file (default: $LORAD_CONFIG, /etc/lorad/config.toml, ./config.toml)",
        )
        p.add_argument("--json", action="store_true", default=default(False), help="print machine-readable JSON")
        return p

    top = options(lambda value: value)
    common = options(lambda value: argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="lorad",
        parents=[top],
        description="Continuous LoRA learning from guard verdicts: watch, buffer, train, gate, promote.",
    )
    parser.add_argument("--version", action="version", version=f"lorad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"lorad.commands.{name}").register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lorad import config, log

    try:
        settings = config.load(args.config)
    except ConfigError as e:
        print(f"lorad: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    log.configure(
        settings.logging.level, settings.logging.format, stream=sys.stderr if args.command not in ("serve",) else None
    )
    try:
        return int(args.func(args, settings) or 0)
    except ConfigError as e:
        print(f"lorad: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    except CommandError as e:
        print(f"lorad: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("lorad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m lorad.cli
    sys.exit(main())
