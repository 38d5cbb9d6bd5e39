"""The control socket: a pathname Unix socket (mode 0660) answering one request per connection.

Each connection is served by a short-lived thread (at most ``max_clients`` at once). The
peer's uid and gid come from SO_PEERCRED; only root, the daemon's own uid, ``allowed_uids``
and members of ``allowed_group`` are served. Everyone else gets a refusal, and the attempt is
logged. Malformed, oversized or unknown requests get an error response; the handler's own
exceptions become an error response too, so no request can disturb the daemon.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from lorad.daemon import protocol

log = structlog.get_logger()

_UCRED = struct.Struct("3i")  # pid, uid, gid


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
                log.warning("allowed_group_missing", group=allowed_group)
        self.group = allowed_group

    def allows(self, peer: Peer) -> bool:
        if peer.uid in self.uids:
            return True
        if self.group_gid is None:
            return False
        if peer.gid == self.group_gid:
            return True
        try:
            name = pwd.getpwuid(peer.uid).pw_name
            return name in grp.getgrgid(self.group_gid).gr_mem
        except KeyError:
            return False


Handler = Callable[[dict, Peer], dict]


class ControlServer:
    """Serves requests on a Unix socket in background threads.

    Args:
        path: the socket file; a stale one is replaced, a live one raises SocketInUse.
        handler: request dict and peer -> response dict (called in a connection thread).
        access: who is served.
        max_clients: connections served at once; more wait in the listen backlog.
        client_timeout: seconds a client may take to send its request.
    """

    def __init__(self, path: Path, handler: Handler, access: Access, max_clients: int = 16,
                 client_timeout: float = 10.0):
        self.path = Path(path)
        self.handler = handler
        self.access = access
        self.client_timeout = client_timeout
        self._slots = threading.BoundedSemaphore(max_clients)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._clients: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        """Bind the socket (mode 0660) and start accepting."""
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
                log.warning("socket_group_not_set", group=self.access.group, path=str(self.path))
        sock.listen(socket.SOMAXCONN)  # bursts of clients queue instead of failing to connect
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="lorad-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, wait for the connections being served, remove the socket file."""
        self._stopping.set()
        if self._thread:
            self._thread.join()
        with self._lock:
            clients = list(self._clients)
        for t in clients:
            t.join(timeout=self.client_timeout + 1)
        if self._sock:
            self._sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            # A free slot first: while every slot is busy, new clients wait in the listen
            # backlog (their connect() retries) instead of being turned away.
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                self._slots.release()
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="lorad-client", daemon=True)
            with self._lock:
                self._clients.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self.client_timeout)
            pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            peer = Peer(pid, uid, gid)
            if not self.access.allows(peer):
                log.warning("client_refused", uid=uid, gid=gid, pid=pid)
                self._reply(conn, protocol.error(f"uid {uid} is not allowed to use this daemon "
                                                 "(see daemon.allowed_uids and daemon.allowed_group)"))
                return
            try:
                line = protocol.read_line(conn, protocol.MAX_REQUEST)
            except TimeoutError:
                self._reply(conn, protocol.error("request not received in time"))
                return
            if line is None:
                log.warning("request_refused", reason="oversized", uid=uid)
                self._reply(conn, protocol.error(f"request over {protocol.MAX_REQUEST} bytes"))
                _drain(conn)
                return
            try:
                request = protocol.decode_request(line)
            except protocol.ProtocolError as e:
                log.warning("request_refused", reason=str(e)[:120], uid=uid)
                self._reply(conn, protocol.error(str(e)))
                return
            try:
                response = self.handler(request, peer)
            except Exception as e:  # the daemon outlives any one request
                log.exception("request_failed", command=request.get("command"))
                response = protocol.error(f"internal error: {type(e).__name__}: {e}")
            self._reply(conn, response)
        except OSError:
            pass  # the client went away
        finally:
            conn.close()
            self._slots.release()
            with self._lock:
                self._clients.discard(threading.current_thread())

    @staticmethod
    def _reply(conn: socket.socket, response: dict) -> None:
        try:
            conn.sendall(protocol.encode(response))
        except OSError:
            pass


def _drain(conn: socket.socket, limit: int = 64 << 20) -> None:
    """Read and drop what an oversized client is still sending, so it can read the refusal."""
    conn.settimeout(1.0)
    try:
        conn.shutdown(socket.SHUT_WR)
        seen = 0
        while seen < limit:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            seen += len(chunk)
    except OSError:
        pass
