"""HTTP for the serving side (vLLM, Ollama): one request, and retrying one. Standard library only.

Every server lorad talks to is told the same way what to do: a request, retried with
exponential back-off on a connection error, a timeout or a 5xx (the server may be restarting),
final on a 4xx (asking again gets the same answer).

A request is bounded as a whole: connecting, sending and every read together must end within
its ``timeout`` (``[[publish]] timeout``), however the server paces its bytes. A server that
drips its reply a byte at a time fails at the deadline as a silent one does. (A file sent as
the body adds its size at ``UPLOAD_BYTES_PER_S``: a base GGUF of gigabytes is not a hung
server.) Response bodies are read whole up to ``MAX_BODY`` and refused beyond it, unread. A
``cancel`` event ends the wait within ``CANCEL_POLL`` seconds of being set.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

OUTPUT_CHARS = 2000  # of a response kept in a message or a hook's detail
MAX_BODY = 1 << 20  # bytes of a response body read at most; a longer one is refused
UPLOAD_BYTES_PER_S = 10 << 20  # a file body's deadline grows by its size at this rate
CANCEL_POLL = 0.2  # seconds between two looks at a cancel event while a request waits

T = TypeVar("T")


class HttpError(Exception):
    """A request that failed: the message names the method, path and why.

    ``status`` is the HTTP status (None when the server was not reached or its answer was
    broken), ``text`` the response body (at most MAX_BODY; messages keep OUTPUT_CHARS of it);
    ``final`` is true for a 4xx, which no retry would change.
    """

    def __init__(self, message: str, status: int | None = None, text: str = ""):
        super().__init__(message)
        self.status, self.text = status, text

    @property
    def final(self) -> bool:
        return self.status is not None and self.status < 500


class Cancelled(HttpError):
    "The request was abandoned because its cancel event was set; never retried."

    @property
    def final(self) -> bool:
        return True


class BodyTooLarge(HttpError):
    "The response body is over MAX_BODY: refused unread; asking again gets the same."

    @property
    def final(self) -> bool:
        return True


def bearer(api_key_env: str) -> dict[str, str]:
    """The Authorization header for the token in ``$api_key_env`` ({} when unset or empty)."""
    key = os.environ.get(api_key_env) if api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


def send(
    url: str,
    method: str,
    path: str,
    body: dict | bytes | Path | None = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float,
    cancel: threading.Event | None = None,
) -> str:
    """One request, whole within ``timeout`` seconds; the response text (at most MAX_BODY bytes).

    Args:
        body: a JSON object, raw bytes, or a file whose bytes are streamed as the body.
        timeout: seconds for the whole request: connect, send, status, headers and body.
        cancel: when set (from another thread), the request is abandoned.

    Raises:
        ValueError: ``url`` is not an http(s) URL with a host (the config refuses those).
        Cancelled: ``cancel`` was set.
        BodyTooLarge: the body is over MAX_BODY.
        HttpError: an HTTP error status, the server could not be reached, its answer was cut
            short or broken, or the deadline passed.
    """
    parts = urlsplit(url.rstrip("/") + path)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    headers = dict(headers or {})
    data: bytes | BinaryIO | None
    if isinstance(body, dict):
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, Path):
        size = body.stat().st_size
        timeout += size / UPLOAD_BYTES_PER_S
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Content-Length"] = str(size)
        data = open(body, "rb")  # noqa: SIM115 - streamed, closed below
    else:
        data = body
    deadline = _Deadline(timeout, cancel)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = (_TlsConnection if parts.scheme == "https" else _Connection)(parts.hostname, parts.port, deadline)
    what = f"{method} {path}"
    try:
        connection.request(method, target, body=data, headers=headers)
        response = connection.getresponse()
        text = _read(response, what).decode("utf-8", "replace")
    except _DeadlinePassed:
        raise HttpError(f"{what}: no whole answer within {timeout:g} s") from None
    except _CancelledNow:
        raise Cancelled(f"{what}: cancelled after {deadline.elapsed():.1f} s") from None
    except http.client.IncompleteRead as e:
        raise HttpError(
            f"{what}: the answer was cut short ({len(e.partial)} bytes of {len(e.partial) + (e.expected or 0)})"
        ) from None
    except (http.client.HTTPException, ssl.SSLError, OSError) as e:
        raise HttpError(f"{what}: {type(e).__name__}: {e}"[:OUTPUT_CHARS]) from None
    finally:
        connection.close()
        if not isinstance(data, bytes | None):  # the file being streamed
            data.close()
    if not 200 <= response.status < 300:
        raise HttpError(f"{what}: HTTP {response.status}: {text[:OUTPUT_CHARS]}", response.status, text)
    return text


def _read(response: http.client.HTTPResponse, what: str) -> bytes:
    """The whole body, or BodyTooLarge: refused before reading when its Content-Length is over
    MAX_BODY, else after MAX_BODY + 1 bytes. IncompleteRead for a cut body."""
    length = response.getheader("Content-Length") or ""
    if length.strip().isdigit() and int(length) > MAX_BODY:
        raise BodyTooLarge(
            f"{what}: HTTP {response.status} with a body of {int(length)} bytes, "
            f"over the {MAX_BODY >> 20} MiB cap; not read",
            response.status,
        )
    if response.length is not None:
        return response.read()  # a known length: IncompleteRead when the server stops short
    data = response.read(MAX_BODY + 1)  # chunked (a cut chunk raises) or up to the close
    if len(data) > MAX_BODY:
        raise BodyTooLarge(
            f"{what}: HTTP {response.status} with a body over the {MAX_BODY >> 20} MiB cap; not read further",
            response.status,
        )
    return data


class _DeadlinePassed(Exception):
    "Raised inside a socket operation (not an OSError: nothing on the way may take it for one)."


class _CancelledNow(Exception):
    "Raised inside a socket operation, like _DeadlinePassed."


class _Deadline:
    """When a request must be over, and what may cut it shorter."""

    def __init__(self, seconds: float, cancel: threading.Event | None):
        self.started = time.monotonic()
        self.at, self.cancel = self.started + seconds, cancel

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds the next socket operation may wait (a slice when a cancel may come).

        Raises:
            _CancelledNow, _DeadlinePassed.
        """
        if self.cancel is not None and self.cancel.is_set():
            raise _CancelledNow()
        left = self.at - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed()
        return min(left, CANCEL_POLL) if self.cancel is not None else left


class _Bounded(socket.socket):
    """Socket methods that wait no later than the deadline: each operation's timeout is what is
    left of it, so the sum of many waits (a reply dripped a byte at a time) is bounded too.

    http.client reads through ``recv_into`` (makefile) and writes through ``sendall``; a TLS
    socket's own waits (one ``recv_into``, one ``send``, the handshake) are bounded by its
    timeout as a whole in CPython, so setting it before each call bounds them alike.
    """

    deadline: _Deadline

    def _bounded(self, operation, *args):
        while True:
            self.settimeout(self.deadline.left())
            try:
                return operation(*args)
            except (TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue  # a slice ended: left() raises when the deadline or a cancel did

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0) -> int:
        return self._bounded(super().recv_into, buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return self._bounded(super().recv, bufsize, flags)

    def sendall(self, data, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self._bounded(super().send, view, flags) :]


class _Socket(_Bounded, socket.socket):
    pass


# SSLSocket names recv's and recv_into's arguments where socket's are positional: _Bounded takes
# socket's signatures and passes every argument through, so both bases are served.
class _TlsSocket(_Bounded, ssl.SSLSocket):  # type: ignore[misc]
    pass


def _connect(host: str, port: int, deadline: _Deadline) -> _Socket:
    """A connected socket to the first address of ``host`` that takes the connection; the
    connect waits in slices of the deadline, so a cancel is seen while connecting too. (The
    name lookup itself is the resolver's: lorad's servers are addresses or local names.)"""
    error: OSError = OSError(f"{host}: no address")
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = _Socket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock.setblocking(False)
            code = sock.connect_ex(address)
            while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                if select.select([], [sock], [], deadline.left())[1]:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"connect to {address[0]} port {address[1]!r}: {os.strerror(code)}")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, deadline: _Deadline):
        super().__init__(host, port)
        self.deadline = deadline

    def connect(self):
        self.sock = _connect(self.host, self.port, self.deadline)


class _TlsConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, deadline: _Deadline):
        super().__init__(host, port)
        self.deadline = deadline

    def connect(self):
        context = ssl.create_default_context()
        context.sslsocket_class = _TlsSocket
        plain = _connect(self.host, self.port, self.deadline)
        sock = cast(  # a _TlsSocket: the context's sslsocket_class
            _TlsSocket,
            context.wrap_socket(
                socket.socket(fileno=plain.detach()), server_hostname=self.host, do_handshake_on_connect=False
            ),
        )
        sock.deadline = self.deadline
        sock._bounded(sock.do_handshake)
        self.sock = sock


def retrying(
    call: Callable[[], T],
    *,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
) -> T:
    """``call()``, again after backoff * 2**n seconds while it raises a HttpError that is not
    final, ``retries`` times at most.

    Args:
        sleep: how to wait between attempts (default: on ``cancel``, or time.sleep).
        cancel: once set, no further attempt is made.

    Raises:
        HttpError: the final one at once; the last one, with "(after N attempts)", when the
            retries ran out.
        Cancelled: ``cancel`` was set before an attempt.
    """
    wait: Callable[[float], object] = sleep or (cancel.wait if cancel is not None else time.sleep)
    for attempt in range(retries + 1):
        if attempt:
            wait(backoff * 2 ** (attempt - 1))
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled before attempt {attempt + 1}")
        try:
            return call()
        except HttpError as e:
            if e.final:
                raise
            last = e
    raise HttpError(f"{last} (after {retries + 1} attempts)", last.status, last.text)
