"""The control socket: a pathname Unix socket (mode 0660) answering one request per connection.

One thread (``lorad-control``) accepts connections and reads them through a selector, so an
idle connection costs a file descriptor and a few hundred bytes, never a thread. Only a
complete request line is handed on: ``status`` and ``ping`` (answered from memory) to two
workers of their own, so they never queue behind slow commands; everything else to
``max_clients`` workers. What a client cannot get around:

- a whole-request deadline: ``client_timeout`` seconds from accept to the end of the request
  line, however the bytes trickle in; then the client is told so and the connection closed;
- at most ``max_per_uid`` connections per peer uid (SO_PEERCRED): one more closes that uid's
  oldest connection still waiting for its request (telling it why), so a uid that floods the
  socket crowds out only itself, and its newest request is still read; ``max_connections``
  bound all uids together (and the same happens when the process runs out of descriptors).

A worker's handler is told whether its client is still there (``gone()``: the client closed
its end, as one that gave up waiting does), so a command that waits on something slow (a
promote whose publish hooks wait on a hung server) returns instead of holding the worker for
an answer no one will read.

The peer's uid and gid come from SO_PEERCRED; only root, the daemon's own uid,
``allowed_uids`` and members of ``allowed_group`` are served. Everyone else gets a refusal,
and the attempt is logged. Malformed, oversized or unknown requests get an error response; the
handler's own exceptions become an error response too, so no request can disturb the daemon.
"""

from __future__ import annotations

import errno
import functools
import grp
import os
import pwd
import queue
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from lorad import events
from lorad.config import DaemonSettings
from lorad.daemon import protocol

log = structlog.get_logger()

_UCRED = struct.Struct("3i")  # pid, uid, gid

QUICK_COMMANDS = frozenset(name for name, c in protocol.COMMANDS.items() if c.where == "memory")
QUICK_WORKERS = 2
INLINE_DECODE = 64 << 10  # request lines up to this size are parsed in the accept thread
DRAIN_SECONDS = 1.0  # how long a refused client may go on sending before it is closed
DRAIN_LIMIT = 64 << 20
GROUP_CACHE_SECONDS = 10.0
WARN_EVERY = 10.0  # seconds between two cap warnings for the same uid


class SocketInUse(Exception):
    "Another daemon already answers on the control socket."


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class Access:
    """Who may use the socket.

    Args:
        allowed_uids: uids served besides root and the daemon's own.
        allowed_group: members of this group (primary or supplementary) are served; "" = none.
    """

    def __init__(self, allowed_uids: tuple[int, ...] = (), allowed_group: str = ""):
        self.uids = {0, os.getuid(), *allowed_uids}
        self.group_gid: int | None = None
        if allowed_group:
            try:
                self.group_gid = grp.getgrnam(allowed_group).gr_gid
            except KeyError:
                log.warning(events.ALLOWED_GROUP_MISSING, group=allowed_group)
        self.group = allowed_group
        self._members: dict[int, tuple[bool, float]] = {}  # uid -> (member, when looked up)

    def allows(self, peer: Peer) -> bool:
        if peer.uid in self.uids:
            return True
        if self.group_gid is None:
            return False
        if peer.gid == self.group_gid:
            return True
        # Why cached: the lookup may go to NSS (LDAP), and it runs in the accept thread.
        now = time.monotonic()
        cached = self._members.get(peer.uid)
        if cached is not None and now - cached[1] < GROUP_CACHE_SECONDS:
            return cached[0]
        try:
            name = pwd.getpwuid(peer.uid).pw_name
            member = name in grp.getgrgid(self.group_gid).gr_mem
        except KeyError:
            member = False
        self._members[peer.uid] = (member, now)
        return member


Handler = Callable[[dict, Peer, Callable[[], bool]], dict]  # (request, peer, gone) -> response


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    fd: int
    peer: Peer
    since: float  # monotonic: when it was accepted
    deadline: float  # the whole request line must have arrived by then
    buf: bytearray = field(default_factory=bytearray)
    drained: int = 0
    closed: bool = False


class ControlServer:
    """Serves requests on a Unix socket: one selector thread reads, workers answer.

    Args:
        path: the socket file; a stale one is replaced, a live one raises SocketInUse.
        handler: ``handler(request, peer, gone) -> response`` (called in a worker thread);
            ``gone()`` is true once the client closed its end of the connection.
        access: who is served.
        max_clients: workers for the commands other than status and ping (requests beyond
            them queue; their connections stay open).
        client_timeout: seconds a client has to send its whole request line (and, later, to
            take the answer).
        max_per_uid: idle connections (no complete request yet) one peer uid may hold open; one
            more closes the oldest of them that has waited at least ``idle_grace`` seconds.
        max_connections: connections held open in all (a hard limit: one more closes the oldest
            idle connection of anyone, or is refused).
        idle_grace: how long a new connection may take to send its request before the per-uid
            cap may close it (a burst of clients, connected but not yet scheduled to send).
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        access: Access,
        max_clients: int = 16,
        client_timeout: float = 10.0,
        max_per_uid: int = DaemonSettings.max_connections_per_uid,
        max_connections: int = 1024,
        idle_grace: float = 1.0,
    ):
        self.path = Path(path)
        self.handler = handler
        self.access = access
        self.client_timeout = client_timeout
        self.max_per_uid = max_per_uid
        self.max_connections = max_connections
        self.idle_grace = idle_grace
        self._n_workers = max_clients
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector  # made by start()
        self._thread: threading.Thread | None = None
        self._workers: list[threading.Thread] = []
        self._quick: queue.SimpleQueue = queue.SimpleQueue()
        self._general: queue.SimpleQueue = queue.SimpleQueue()
        # Only the selector thread touches these two; both are in deadline order.
        self._waiting: OrderedDict[int, _Conn] = OrderedDict()  # fd -> reading its request
        self._draining: OrderedDict[int, _Conn] = OrderedDict()  # fd -> answered, discarding input
        self._idle: Counter[int] = Counter()  # uid -> connections in the two above
        self._lock = threading.Lock()  # _total: workers release connections too
        self._total = 0  # connections open: idle, queued for a worker, being answered
        self._warned: dict[tuple, float] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind the socket (mode 0660), start the workers and the selector thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # stale: left by a daemon that died
            else:
                raise SocketInUse(f"another lorad daemon is listening on {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)  # the file is born 0660: never a moment of wider access
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        if self.access.group_gid is not None:
            try:
                os.chown(self.path, -1, self.access.group_gid)
            except PermissionError:
                log.warning(events.SOCKET_GROUP_NOT_SET, group=self.access.group, path=str(self.path))
        sock.listen(socket.SOMAXCONN)  # bursts of clients queue instead of failing to connect
        sock.setblocking(False)
        self._sock = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        for jobs, n, name in (
            (self._quick, QUICK_WORKERS, "lorad-control-quick"),
            (self._general, self._n_workers, "lorad-control-worker"),
        ):
            for _ in range(n):
                t = threading.Thread(target=self._work, args=(jobs,), name=name, daemon=True)
                t.start()
                self._workers.append(t)
        self._thread = threading.Thread(target=self._loop, name="lorad-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, let the workers finish what they serve, remove the socket file."""
        self._stopping.set()
        if self._thread:
            self._thread.join()
        for _ in range(QUICK_WORKERS):
            self._quick.put(None)
        for _ in range(self._n_workers):
            self._general.put(None)
        deadline = time.monotonic() + self.client_timeout + 1
        for t in self._workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._sock:
            self._sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    # -- the selector thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(self._wait_time()):
                    try:
                        if key.data is None:
                            self._accept()
                        else:
                            self._readable(key.data)
                    except Exception:  # this thread must outlive any one connection
                        log.exception(events.CONTROL_CONNECTION_FAILED)
                        if key.data is not None:
                            self._close(key.data)
                self._expire(time.monotonic())
        finally:
            for conn in [*self._waiting.values(), *self._draining.values()]:
                self._close(conn)
            self._selector.close()

    def _wait_time(self) -> float:
        wait = 0.2  # how soon a stop() is noticed
        now = time.monotonic()
        for conns in (self._waiting, self._draining):
            if conns:
                wait = min(wait, next(iter(conns.values())).deadline - now)
        return max(0.0, wait)

    def _accept(self) -> None:
        listener = self._sock
        if listener is None:  # not started
            return
        for _ in range(64):  # then read what is waiting, and come back
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._warn(("fds",), "control_connections_limited", reason=os.strerror(e.errno))
                    if not self._make_room(
                        None,
                        "closed: the daemon ran out of file descriptors; "
                        "this connection waited longest for its request",
                    ):
                        time.sleep(0.05)  # nothing to close: let the workers finish some
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        try:
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        peer = Peer(pid, uid, gid)
        if self._idle[uid] >= self.max_per_uid:
            self._make_room(
                uid,
                f"closed: uid {uid} has more than {self.max_per_uid} connections open "
                "at once (daemon.max_connections_per_uid); this one waited longest "
                "for its request",
            )
        with self._lock:
            over_all = self._total >= self.max_connections
        if over_all and not self._make_room(
            None,
            f"closed: the daemon holds {self.max_connections} connections; this one waited longest for its request",
        ):
            _send_now(
                sock, protocol.error(f"refused: the daemon is serving {self.max_connections} connections; try again")
            )
            sock.close()
            return
        with self._lock:
            self._total += 1
        now = time.monotonic()
        conn = _Conn(sock, sock.fileno(), peer, now, now + self.client_timeout)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._idle[uid] += 1
        if not self.access.allows(peer):
            log.warning(events.CLIENT_REFUSED, uid=uid, gid=gid, pid=pid)
            self._refuse(
                conn, f"uid {uid} is not allowed to use this daemon (see daemon.allowed_uids and daemon.allowed_group)"
            )
            return
        self._waiting[conn.fd] = conn

    def _readable(self, conn: _Conn) -> None:
        draining = conn.fd in self._draining
        try:
            data = conn.sock.recv(1 << 20 if draining else 65536)
        except BlockingIOError:
            return
        except OSError:
            data = None
        if draining:
            conn.drained += len(data or b"")
            if not data or conn.drained > DRAIN_LIMIT:
                self._close(conn)
            return
        if data is None:
            self._close(conn)  # the client went away
            return
        if not data:  # the client ended its request by closing its side
            self._dispatch(conn, bytes(conn.buf))
            return
        start = len(conn.buf)
        conn.buf += data
        end = conn.buf.find(b"\n", start)
        if end >= 0 and end < protocol.MAX_REQUEST:
            self._dispatch(conn, bytes(conn.buf[:end]))
        elif end >= 0 or len(conn.buf) >= protocol.MAX_REQUEST:
            log.warning(events.REQUEST_REFUSED, reason="oversized", uid=conn.peer.uid)
            self._refuse(conn, f"request over {protocol.MAX_REQUEST} bytes")

    def _dispatch(self, conn: _Conn, line: bytes) -> None:
        """Hand a complete request line to a worker; the selector forgets the connection."""
        self._forget(conn)
        conn.buf = bytearray()
        request = response = None
        jobs = self._general
        if len(line) <= INLINE_DECODE:
            request, response = _decode(line, conn.peer)
            if request is None or request["command"] in QUICK_COMMANDS:  # an error answer is quick
                jobs = self._quick
        jobs.put((conn, line, request, response))

    def _refuse(self, conn: _Conn, message: str) -> None:
        """Answer with an error now and discard what the client still sends, so it can read it."""
        _send_now(conn.sock, protocol.error(message))
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._waiting.pop(conn.fd, None)
        conn.buf = bytearray()
        conn.deadline = time.monotonic() + DRAIN_SECONDS
        self._draining[conn.fd] = conn

    def _expire(self, now: float) -> None:
        while self._waiting:
            conn = next(iter(self._waiting.values()))
            if conn.deadline > now:
                break
            log.info(events.REQUEST_TIMED_OUT, uid=conn.peer.uid, received=len(conn.buf))
            _send_now(conn.sock, protocol.error(f"request not received within {self.client_timeout:g} s"))
            self._close(conn)
        while self._draining:
            conn = next(iter(self._draining.values()))
            if conn.deadline > now:
                break
            self._close(conn)

    def _make_room(self, uid: int | None, message: str) -> bool:
        """Free one idle connection (of ``uid``, or of anyone); False when there is none.

        Answered ones go first, then the oldest still waiting for its request (for a uid's cap,
        only one older than ``idle_grace``). Each is read once more before it is judged: in a
        burst of clients the accept loop runs ahead of the reads, and a request may be waiting
        in it already (then it goes to a worker).
        """
        for conn in list(self._draining.values()):
            if uid is None or conn.peer.uid == uid:
                self._close(conn)
                return True
        young = time.monotonic() - self.idle_grace
        for conn in list(self._waiting.values()):
            if uid is not None and conn.peer.uid != uid:
                continue
            if uid is not None and conn.since > young:
                return False  # the rest are younger still: let the uid run over its cap a moment
            self._readable(conn)
            if conn.fd in self._waiting:  # nothing complete arrived: it is the idle one
                self._warn(("dropped", conn.peer.uid), "client_dropped", uid=conn.peer.uid, reason=message)
                _send_now(conn.sock, protocol.error(message))
                self._close(conn)
            return True
        return False

    def _close(self, conn: _Conn) -> None:
        """Forget a connection the selector holds and close it."""
        self._forget(conn)
        self._release(conn)

    def _forget(self, conn: _Conn) -> None:
        if self._waiting.pop(conn.fd, None) or self._draining.pop(conn.fd, None):
            self._idle[conn.peer.uid] -= 1
            if self._idle[conn.peer.uid] <= 0:
                del self._idle[conn.peer.uid]
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _release(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.sock.close()
        with self._lock:
            self._total -= 1

    def _warn(self, key: tuple, event: str, **fields) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY) >= WARN_EVERY:
            self._warned[key] = now
            log.warning(event, **fields)

    # -- the workers ------------------------------------------------------------------------------

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            item = jobs.get()
            if item is None:
                return
            conn, line, request, response = item
            try:
                if request is None and response is None:
                    request, response = _decode(line, conn.peer)
                if response is None:
                    try:
                        response = self.handler(request, conn.peer, functools.partial(_gone, conn.sock))
                    except Exception as e:  # the daemon outlives any one request
                        log.exception(events.REQUEST_FAILED, command=request.get("command"))
                        response = protocol.error(f"internal error: {type(e).__name__}: {e}")
                conn.sock.settimeout(self.client_timeout)  # a client that never reads cannot hold us
                conn.sock.sendall(protocol.encode(response))
            except OSError:
                pass  # the client went away
            finally:
                self._release(conn)


def _decode(line: bytes, peer: Peer) -> tuple[dict, None] | tuple[None, dict]:
    """(request, None), or (None, an error response) for a line that is not a valid request."""
    try:
        return protocol.decode_request(line), None
    except protocol.ProtocolError as e:
        log.warning(events.REQUEST_REFUSED, reason=str(e)[:120], uid=peer.uid)
        return None, protocol.error(str(e))


def _gone(sock: socket.socket) -> bool:
    """The client closed its end (or the connection broke): no one will read an answer.

    POLLHUP on a Unix stream socket means both directions are shut, which a close gives and a
    client that only ended its sending side (SHUT_WR, still waiting to read) does not.
    """
    poller = select.poll()
    try:
        poller.register(sock.fileno(), 0)  # HUP, ERR and NVAL are always reported
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed under us
        return True


def _send_now(sock: socket.socket, response: dict) -> None:
    """Best effort, without blocking: an error line fits in any socket buffer."""
    try:
        sock.send(protocol.encode(response), socket.MSG_DONTWAIT)
    except OSError:
        pass
