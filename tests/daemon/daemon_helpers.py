"""Helpers for daemon tests: a `lorad serve` subprocess, its config, artifact files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from lorad.daemon import protocol


def write_artifact(
    store: Path,
    *,
    artifact_id: str | None = None,
    workflow_id: str | None = None,
    status: str = "accepted",
    attempt: int = 1,
    previous: str | None = None,
    content: str = "def f(x):\n    return x + 1\n",
    spec: str = "Write f(x) returning x + 1.",
    feedback: str = "All tests passed",
    feedback_history: list | None = None,
) -> str:
    """Write one AtomicGuard artifact file the way the library does (temp file, then rename)."""
    artifact_id = artifact_id or str(uuid.uuid4())
    workflow_id = workflow_id or str(uuid.uuid4())
    obj = {
        "artifact_id": artifact_id,
        "workflow_id": workflow_id,
        "content": content,
        "previous_attempt_id": previous,
        "parent_action_pair_id": None,
        "action_pair_id": "g_coder",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "attempt_number": attempt,
        "status": status,
        "guard_result": {
            "passed": status == "accepted",
            "feedback": feedback,
            "fatal": False,
            "guard_name": "TestGuard",
            "metadata": None,
            "sub_results": [],
        },
        "context": {
            "workflow_id": workflow_id,
            "specification": spec,
            "constraints": "Return only Python code.",
            "feedback_history": feedback_history or [],
            "dependency_artifacts": {},
        },
        "source": "generated",
        "metadata": {},
    }
    folder = store / "objects" / artifact_id[:2]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{artifact_id}.tmp"
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, folder / f"{artifact_id}.json")
    return artifact_id


class Daemon:
    """A `lorad serve` subprocess with its config, state directory and log."""

    def __init__(self, root: Path, config_text: str, env: dict | None = None):
        self.root = root
        self.config = root / "config.toml"
        self.config.write_text(config_text)
        self.log_path = root / "daemon.log"
        self.socket = root / "lorad.sock"
        inherited = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LORAD_CONFIG")
        }
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it; stop() closes it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorad", "--config", str(self.config), "serve"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.request("ping", timeout=2)["ok"]:
                    return
            except (protocol.DaemonUnavailable, OSError):
                time.sleep(0.05)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log_text()}")

    def request(self, command: str, timeout: float = 10, **kw) -> dict:
        return protocol.request(self.socket, command, timeout=timeout, **kw)

    def cli(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lorad", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            input=input,
        )

    def wait_for(self, predicate, timeout: float = 10, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as e:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    child.kill()
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log_text()[-4000:]}") from e
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code


def config_text(root: Path, store: Path | None, **sections) -> str:
    """A daemon config: state and socket under ``root``, one AtomicGuard source, extra keys per section."""
    lines = ["[daemon]", f'state_dir = "{root / "state"}"', f'socket = "{root / "lorad.sock"}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in sections.pop("daemon", {}).items()]
    if store is not None:
        lines += ["[[store.sources]]", 'kind = "atomicguard"', f'path = "{store}"']
    sections.setdefault("schedule", {})
    sections["schedule"].setdefault("windows", ["00:00-24:00"])
    sections["schedule"].setdefault("min_new_examples", 100000)  # no training unless a test asks
    sections["schedule"].setdefault("timezone", "UTC")
    sections.setdefault("logging", {}).setdefault("format", "json")
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def training_sections(model_dir: Path, max_steps: int = 6, save_steps: int = 2, **schedule) -> dict:
    """Config sections for a tiny-model job on the fixture store that promotes in a few steps."""
    return {
        "schedule": {"timezone": "UTC", **schedule},
        "selection": {"policy": "all_successes", "heldout_fraction": 0.3},
        "training": {
            "base_model": str(model_dir),
            "max_steps": max_steps,
            "save_steps": save_steps,
            "batch_size": 2,
            "max_seq_length": 256,
            "quantization": "none",
            "gradient_checkpointing": False,
            "learning_rate": 0.01,
            "train_examples": 40,
        },
        "evaluation": {"min_improvement": 0.0, "min_heldout_examples": 2, "eval_batch_size": 4},
    }


WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def worker_processes(job_dir) -> list:
    """Live processes whose command line names the job directory (the worker and its children)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(job_dir) in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def as_uid(uid: int, gid: int, fn) -> dict:
    """Run ``fn()`` in a forked child that dropped to uid/gid; its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            answer = fn()
        except BaseException as e:
            answer = {"client_error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(answer).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)
