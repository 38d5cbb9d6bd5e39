"""The control protocol: one JSON request line, one JSON response line, over a Unix socket.

A request is ``{"command": "status", ...arguments}``. A response is ``{"ok": true, ...}`` or
``{"ok": false, "error": "why"}``. A request line longer than :data:`MAX_REQUEST` bytes is
refused without being read further.

:data:`COMMANDS` is the one table of the protocol: each command's argument dataclass (its
fields are the request's arguments, typed and checked by :func:`parse_arguments`) and where the
daemon runs it (:class:`Command`). The daemon dispatches through it; the fuzz tests draw from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MAX_REQUEST = 1 << 20  # bytes, newline included
MAX_RESPONSE = 64 << 20


class BadArguments(ValueError):
    "A request's arguments are missing or of the wrong type; the message names the argument."


def _positive(v) -> str | None:
    return None if v >= 1 else f"must be a positive integer, got {v!r}"


@dataclass(frozen=True)
class NoArguments:
    pass


@dataclass(frozen=True)
class JobsArguments:
    limit: int = field(default=20, metadata={"check": _positive})


@dataclass(frozen=True)
class JobArguments:
    job_id: str


@dataclass(frozen=True)
class FeedbackArguments:
    record: dict
    update: bool = False


@dataclass(frozen=True)
class ChangeArguments:
    """promote (a version is required) and rollback (to the previous version when none)."""

    version: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Command:
    """One command: its arguments, and where the daemon runs it.

    ``where``: "memory" (status, ping: answered from memory by their own workers), "reader"
    (read-only queries on a read-only connection), "ingest" (feedback: written by the ingest
    thread), "main" (state changes, in the main loop), "release" (promote/rollback: a thread of
    their own, their hooks may wait on a server).
    """

    arguments: type
    where: Literal["memory", "reader", "ingest", "main", "release"]


COMMANDS: dict[str, Command] = {
    "ping": Command(NoArguments, "memory"),
    "status": Command(NoArguments, "memory"),
    "jobs": Command(JobsArguments, "reader"),
    "job": Command(JobArguments, "reader"),
    "history": Command(NoArguments, "reader"),
    "feedback": Command(FeedbackArguments, "ingest"),
    "train_now": Command(NoArguments, "main"),
    "cancel": Command(JobArguments, "main"),
    "pause": Command(NoArguments, "main"),
    "resume": Command(NoArguments, "main"),
    "reload": Command(NoArguments, "main"),
    "promote": Command(ChangeArguments, "release"),
    "rollback": Command(ChangeArguments, "release"),
}


def parse_arguments(request: dict):
    """The request's arguments as its command's dataclass.

    Raises:
        BadArguments: a required argument is missing or one has the wrong type or value.
    """
    name = request["command"]
    cls = COMMANDS[name].arguments
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in request:
            if f.default is dataclasses.MISSING:
                raise BadArguments(f'{name}: needs "{f.name}"')
            continue
        value = request[f.name]
        if not _is(value, hints[f.name]):
            raise BadArguments(f"{name}: {f.name} must be {_describe(hints[f.name])}, got {value!r}"[:200])
        if isinstance(value, str) and not _unicode(value):  # no SQLite query can carry it
            raise BadArguments(f"{name}: {f.name} holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text")
        why = f.metadata["check"](value) if "check" in f.metadata and value is not None else None
        if why:
            raise BadArguments(f"{name}: {f.name} {why}"[:200])
        values[f.name] = value
    return cls(**values)


def _is(value, hint) -> bool:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option in (int, str, dict) and isinstance(value, option) and not isinstance(value, bool):
            return True
    return False


def _unicode(text: str) -> bool:
    """Whether ``text`` is Unicode text: JSON's escapes can carry a lone surrogate ("\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(hint) -> str:
    names = {int: "an integer", str: "a string", dict: "a JSON object", bool: "true or false", type(None): "null"}
    options = typing.get_args(hint) or (hint,)
    return " or ".join(names[o] for o in options)


class ProtocolError(Exception):
    "A request or response line is not valid protocol."


class DaemonUnavailable(Exception):
    "No daemon is listening on the control socket."


class DaemonTimeout(TimeoutError):
    "A daemon is there but did not answer in time; a request it was sent may still be applied."


class SocketPathTooLong(ValueError):
    "The socket path does not fit in a Unix socket address."


MAX_SOCKET_PATH = 107  # bytes: sun_path is 108, and the kernel wants room for the NUL


def socket_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a Unix socket address, or None."""
    size = len(os.fsencode(str(path)))
    if size > MAX_SOCKET_PATH:
        return (
            f"{path} is {size} bytes long; a Unix socket path can be at most "
            f"{MAX_SOCKET_PATH} bytes (choose a shorter daemon.socket or daemon.state_dir)"
        )
    return None


def encode(message: dict) -> bytes:
    return json.dumps(message, default=str, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> dict:
    """Parse one request line.

    Raises:
        ProtocolError: not JSON, not an object, or no known ``command``.
    """
    if len(line) > MAX_REQUEST:
        raise ProtocolError(f"request over {MAX_REQUEST} bytes")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, or a 4300+ digit int
        raise ProtocolError(f"malformed JSON: {e}"[:200]) from None
    if not isinstance(message, dict):
        raise ProtocolError("request must be a JSON object")
    command = message.get("command")
    if not isinstance(command, str):
        raise ProtocolError('request needs a "command" string')
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command {command[:64]!r}; expected one of {sorted(COMMANDS)}")
    return message


def error(message: str) -> dict:
    return {"ok": False, "error": message}


def read_line(sock: socket.socket, limit: int) -> bytes | None:
    """Bytes up to the first newline; None when the line runs past ``limit``."""
    chunks, size = [], 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            size += end
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    line = b"".join(chunks)
    return None if len(line) + 1 > limit else line


def _connect(sock: socket.socket, path: str, timeout: float | None) -> None:
    """connect(), retried while the daemon's accept queue is full.

    Why: with a timeout set, a Unix socket's connect() fails at once with EAGAIN when the
    listen backlog is full instead of waiting (100 concurrent clients showed it).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise DaemonTimeout(
                    f"the daemon did not take the connection within {timeout:g} s "
                    "(its queue stayed full); nothing was sent"
                ) from None
            time.sleep(0.005)


def request(path: str | Path, command: str, timeout: float | None = 30.0, **arguments: Any) -> dict:
    """Send one request to the daemon and return its response.

    Raises:
        DaemonUnavailable: nothing listens at ``path``, or it closed the connection unanswered.
        DaemonTimeout: the daemon did not take the connection, or did not answer, within
            ``timeout`` seconds (after it was sent, the request may still be applied).
        SocketPathTooLong: ``path`` cannot be a Unix socket address.
        ProtocolError: the answer is not a JSON object.
    """
    problem = socket_path_problem(path)
    if problem:
        raise SocketPathTooLong(problem)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            _connect(sock, str(path), timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(f"no lorad daemon is running (nothing listens on {path}: {e.strerror})") from None
        except PermissionError:
            raise DaemonUnavailable(
                f"permission denied on {path}: ask for membership of the daemon's allowed_group, or run as its user"
            ) from None
        try:
            sock.sendall(encode({"command": command, **arguments}))
        except BrokenPipeError:
            pass  # refused mid-send (too large, not allowed): the reason is waiting to be read
        except TimeoutError:  # the line never ended, so the daemon cannot have acted on it
            raise DaemonTimeout(
                f"the daemon did not take the request within {timeout:g} s; nothing was applied"
            ) from None
        try:
            line = read_line(sock, MAX_RESPONSE)
        except TimeoutError:
            raise DaemonTimeout(
                f"the daemon did not answer within {timeout:g} s; the request was sent "
                "and may still have been applied (check before repeating it)"
            ) from None
        except ConnectionResetError:
            raise DaemonUnavailable("the daemon closed the connection") from None
    finally:
        sock.close()
    if not line:
        raise DaemonUnavailable("the daemon closed the connection without answering")
    try:
        response = json.loads(line)
    except json.JSONDecodeError:
        raise ProtocolError("the daemon's answer is not JSON") from None
    if not isinstance(response, dict):
        raise ProtocolError("the daemon's answer is not a JSON object")
    return response
