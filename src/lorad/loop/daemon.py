"""lorad's side of the loop: ``lorad serve`` as a child process, driven through its socket.

A round's traffic flows while scheduling is paused (as if the training window were closed);
:meth:`Daemon.cycle` waits until the daemon holds every attempt of the round, resumes
scheduling, and the daemon's own scheduler starts the cycle; the round ends when the job does
(its publish hooks have run by then: the server serves the promoted version).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from lorad.buffer.job_table import FINAL


class LoopError(Exception):
    "The daemon exited or did not get where the loop needed it in time; the message says where its log is."


def store_files(store: Path) -> int:
    """Artifact files in an AtomicGuard store (what the daemon must have ingested)."""
    objects = Path(store) / "objects"
    return sum(1 for _ in objects.rglob("*.json")) if objects.is_dir() else 0


class Daemon:
    """``lorad --config CONFIG serve`` started in ``work``; its log is ``work/daemon.log``."""

    def __init__(self, work: Path, config: Path, socket: Path):
        self.work, self.config, self.socket = Path(work), Path(config), Path(socket)
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.work / "daemon.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exit_code(self) -> int | None:
        """Its exit status once it has exited; None while it runs (or before it starts)."""
        return self.process.poll() if self.process is not None else None

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lorad", "--config", str(self.config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        log.close()
        self.wait_for(lambda status: True, timeout, "the daemon to answer")

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, as systemd stops it; SIGKILL after ``timeout``. Returns its exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def request(self, command: str, timeout: float = 30.0, **args) -> dict:
        from lorad.daemon.protocol import request

        return request(self.socket, command, timeout=timeout, **args)

    def status(self) -> dict | None:
        from lorad.daemon.protocol import DaemonTimeout, DaemonUnavailable

        try:
            reply = self.request("status")
        except (DaemonUnavailable, DaemonTimeout):
            return None
        return reply if reply.get("ok") else None

    def wait_for(self, ready, timeout: float, what: str) -> dict:
        """The first status for which ``ready(status)`` holds, polled twice a second."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise LoopError(f"the daemon exited ({self.process.returncode}); see {self.log_path}")
            status = self.status()
            if status is not None and ready(status):
                return status
            time.sleep(0.5)
        raise LoopError(f"timed out waiting for {what}; see {self.log_path}")

    def active_version(self) -> str | None:
        return (self.status() or {}).get("active_version")

    def cycle(self, store: Path, *, timeout: float = 7200.0, on_job=None) -> dict:
        """One cycle on what the store holds now: ingest all of it, let the scheduler start a job,
        wait for its end; scheduling is paused again after. Returns the job's row.

        Args:
            on_job: called with the job row every poll while it runs (progress display).
        """
        files = store_files(store)
        self.wait_for(lambda s: s["buffer"]["artifacts"] >= files, 600, "the round's attempts to be ingested")
        known = {j["job_id"] for j in self.request("jobs", limit=1000)["jobs"]}
        self.request("resume")
        try:
            started = time.monotonic()
            while time.monotonic() - started < timeout:
                if self.process is not None and self.process.poll() is not None:
                    raise LoopError(f"the daemon exited ({self.process.returncode}); see {self.log_path}")
                fresh = [j for j in self.request("jobs", limit=50)["jobs"] if j["job_id"] not in known]
                if not fresh and time.monotonic() - started > 30:
                    decision = ((self.status() or {}).get("schedule") or {}).get("decision") or ""
                    if decision.startswith("waiting for"):  # too few new examples: no cycle this round
                        return {"job_id": None, "state": "not started", "reason": decision}
                if fresh:
                    job = self.request("job", job_id=fresh[0]["job_id"]).get("job") or fresh[0]
                    if on_job is not None:
                        on_job(job)
                    if job["state"] in FINAL:
                        return job
                time.sleep(1.0)
            raise LoopError(f"no cycle ended within {timeout:g} s; see {self.log_path}")
        finally:
            self.request("pause")
