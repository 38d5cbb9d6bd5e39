"""kill -9 at each step of a job's conclusion: the restart finishes it, never trains again.

One tiny job is trained once, and its process killed just before the conclusion; the state
directory as it was then is restored before each kill point. At each point a fresh process
concludes the job and is SIGKILLed there; then a fresh process recovers the job as the daemon
does at start and runs it. Whatever the point: one version, promoted once (one audit row),
the job promoted, the worker never run again, and the publish hook run once, or twice when
the kill came while it ran or before its run was recorded.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import WORKER_ENV, config_text, training_sections

pytestmark = pytest.mark.faults

# Runs in a fresh process: patch the kill point in, then run (or recover and run) the job.
SCRIPT = r"""
import json, os, signal, sys
from lorad import config, release
from lorad import cycle
from lorad.cycle import driver
from lorad.release import registry
from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Buffer

settings = config.load(sys.argv[1])
point, job_id = sys.argv[2], sys.argv[3]


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def after(owner, name):
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        die()
        return out

    setattr(owner, name, wrapped)


patch = {
    "before-conclude": lambda: setattr(driver, "conclude", die),
    "after-version": lambda: after(registry.Registry, "create"),
    "before-pointer": lambda: setattr(registry.Registry, "promote", die),
    "after-pointer": lambda: after(registry.Registry, "promote"),
    "during-hooks": lambda: None,  # the hook itself kills its parent (see the config)
    "after-hooks": lambda: after(release, "publish"),
    "before-final-state": lambda: setattr(driver._Job, "finish", die),
    "restart": lambda: None,
}
patch[point]()
with Buffer(settings.buffer_path) as buffer:
    store = JobStore(buffer.conn)
    if job_id == "new":
        from lorad.sources.ingest import ingest
        from lorad.sources import open_sources

        ingest(buffer, open_sources(settings.store), 500)
        job_id = store.create("cli")["job_id"]
        print("JOB", job_id, flush=True)
    recovered = [j["job_id"] for j in cycle.recover(settings, store)] if point == "restart" else []
outcome = cycle.run(settings, job_id, holder="the fault test")
print("RESULT", json.dumps({"recovered": recovered, "outcome": outcome.as_dict()}), flush=True)
"""

# (kill point, times the publish hook has run for the promotion when the job is done)
POINTS = [
    ("after-version", 1),
    ("before-pointer", 1),
    ("after-pointer", 1),
    ("during-hooks", 2),
    ("after-hooks", 2),
    ("before-final-state", 1),
]


def run(cfg: Path, point: str, job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cfg), point, job_id],
        capture_output=True,
        text=True,
        timeout=300,
        env={**WORKER_ENV, "PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": ":".join(sys.path)},
    )


def test_a_kill_at_any_step_of_the_conclusion_is_finished_at_restart_exactly_once(short_root, store, tiny_model):
    state = short_root / "state"
    hooks_log, flag = short_root / "hooks.log", short_root / "kill-during-hook"
    # The hook records each run; when the flag file exists it takes it and kills the process
    # running it, as a kill -9 of the daemon during a slow publish would.
    hook = [
        "sh",
        "-c",
        f'echo "$0" >> {hooks_log}; if rm {flag} 2>/dev/null; then kill -9 $PPID; sleep 5; fi',
        "{version}",
    ]
    sections = training_sections(tiny_model)
    cfg = short_root / "config.toml"
    cfg.write_text(
        config_text(short_root, store, **sections) + '[[publish]]\nkind = "command"\nargv = ' + json.dumps(hook) + "\n"
    )

    first = run(cfg, "before-conclude", "new")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    job_id = next(line.split()[1] for line in first.stdout.splitlines() if line.startswith("JOB "))
    snapshot = short_root / "snapshot"
    shutil.copytree(state, snapshot, symlinks=True)

    for point, hook_runs in POINTS:
        shutil.rmtree(state)
        shutil.copytree(snapshot, state, symlinks=True)
        hooks_log.unlink(missing_ok=True)
        if point == "during-hooks":
            flag.touch()
        killed = run(cfg, point, job_id)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stdout, killed.stderr[-3000:])

        done = run(cfg, "restart", job_id)
        assert done.returncode == 0, (point, done.stderr[-3000:])
        report = json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")))
        outcome = report["outcome"]
        assert report["recovered"] == [job_id], point  # left evaluating: concluded at once, window or not
        assert outcome["status"] == "promoted", (point, outcome)
        versions = sorted(p.name for p in (state / "adapters").iterdir() if p.name.startswith("v"))
        assert versions == [outcome["version"]], (point, versions)
        assert (state / "adapters" / "current").readlink().name == outcome["version"], point
        assert hooks_log.read_text().split() == [outcome["version"]] * hook_runs, point

        import sqlite3

        db = sqlite3.connect(state / "buffer.sqlite3")
        promoted = db.execute("SELECT count(*) FROM audit WHERE event = 'adapter_promoted'").fetchone()[0]
        job = db.execute("SELECT state, version, runs FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        db.close()
        assert promoted == 1, point
        assert job == ("promoted", outcome["version"], 1), (point, job)
        # The worker ran once, in the first process: its progress shows one start.
        stages = [json.loads(line)["stage"] for line in (state / "jobs" / job_id / "progress.jsonl").open()]
        assert stages.count("preparing") == 1, point
