"""sd_notify, written out: one datagram per message to $NOTIFY_SOCKET, a no-op without it.

``READY=1`` is sent only once the watcher, the scheduler and the control socket are up;
``STATUS=`` lines carry the job state; ``WATCHDOG=1`` is sent at half of $WATCHDOG_USEC
(when $WATCHDOG_PID, if set, names this process), as systemd's sd_watchdog_enabled() reads it.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends sd_notify messages to the socket systemd names in the environment.

    Args:
        environ: where to read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (os.environ).
        watchdog: send keep-alives when systemd asks for them (``daemon.watchdog``).
    """

    def __init__(self, environ=None, watchdog: bool = True):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if watchdog and usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2
        self._last_ping = 0.0

    def notify(self, *lines: str) -> bool:
        """Send one message (lines joined by newlines). Returns False when there is no socket."""
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto("\n".join(lines).encode(), self.address)
            except OSError:
                return False  # systemd went away; nothing to tell
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def ping(self, now: float | None = None) -> bool:
        """WATCHDOG=1 if half the watchdog interval has passed since the last one."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog_interval:
            return False
        self._last_ping = now
        return self.notify("WATCHDOG=1")
