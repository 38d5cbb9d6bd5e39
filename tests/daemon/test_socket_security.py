"""Who can reach the daemon, what it leaves readable, and whether it keeps answering under load.

The daemon runs here with the test's umask (022), as a user starting `lorad serve` by hand would;
the unit file's UMask=0027 must not be what keeps the state private.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
from daemon_helpers import WORKER_ENV, as_uid, training_sections

from lorad.daemon import protocol

NOBODY = 65534
FINAL = ("promoted", "rejected", "failed", "cancelled")


def world_accessible(root) -> list[str]:
    """Paths under ``root`` that others (not owner, not group) may read, write or enter."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                continue
            if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH):
                found.append(f"{oct(mode & 0o777)} {os.path.relpath(p, root)}")
    return found


@pytest.fixture
def root_only():
    if os.getuid() != 0:
        pytest.fail("these tests switch to another uid, which needs root (CI runs the suite as root)")


def test_other_uid_cannot_connect_through_the_0660_socket(daemon_factory, root_only):
    d = daemon_factory()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
    answer = as_uid(NOBODY, NOBODY, lambda: protocol.request(d.socket, "status", timeout=5))
    assert "permission denied" in answer.get("client_error", ""), answer


def test_peer_credentials_refuse_another_uid_even_when_the_socket_file_is_opened_up(daemon_factory, root_only):
    d = daemon_factory()
    os.chmod(d.socket, 0o666)  # a careless chmod: SO_PEERCRED still decides
    for uid, gid in ((NOBODY, NOBODY), (4242, 4242)):
        answer = as_uid(uid, gid, lambda: protocol.request(d.socket, "status", timeout=5))
        assert answer.get("ok") is False and f"uid {uid} is not allowed" in answer["error"], answer
        assert "buffer" not in answer  # nothing about the state leaks in the refusal
        # State-changing commands are refused the same way, before anything happens.
        changed = as_uid(uid, gid, lambda: protocol.request(d.socket, "pause", timeout=5))
        assert changed.get("ok") is False and "not allowed" in changed["error"]
    assert d.request("status")["scheduling_paused"] is False
    refused = [e for e in d.events() if e.get("event") == "client_refused"]
    assert {e["uid"] for e in refused} == {NOBODY, 4242} and len(refused) == 4


def test_hundred_concurrent_clients_get_status_while_a_job_trains_and_state_stays_private(daemon_factory, tiny_model):
    d = daemon_factory(env=WORKER_ENV, **training_sections(tiny_model, max_steps=60, save_steps=2))
    job_id = d.request("train_now")["job"]["job_id"]
    d.wait_for(
        lambda: (d.request("job", job_id=job_id)["job"].get("progress") or {}).get("step", 0) >= 2,
        timeout=180,
        what="the job to train and checkpoint",
    )

    answers: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(100)

    def client() -> None:
        start.wait()
        for _ in range(3):
            try:
                a = protocol.request(d.socket, "status", timeout=30)
            except Exception as e:  # collected and asserted below
                a = {"client_error": f"{type(e).__name__}: {e}"}
            with lock:
                answers.append(a)

    threads = [threading.Thread(target=client) for _ in range(100)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    assert len(answers) == 300, f"{len(answers)} answers, {errors}"
    bad = [a for a in answers if a.get("ok") is not True]
    assert not bad, f"{len(bad)} of 300 not answered with status, e.g. {bad[:3]}"
    assert all(a["job"] and a["job"]["job_id"] == job_id and a["job"]["state"] == "training" for a in answers)
    assert elapsed < 60

    done = d.wait_for(
        lambda: (j := d.request("job", job_id=job_id)["job"])["state"] in FINAL and j,
        timeout=300,
        what="the job to finish",
    )
    assert done["state"] == "promoted", done
    state = d.root / "state"
    # the job left data, checkpoints, an adapter version and the current pointer to check
    assert (state / "jobs" / job_id / "train.jsonl").is_file() and (state / "adapters" / "current").exists()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
    exposed = world_accessible(state)
    assert not exposed, "state others can read or write:\n" + "\n".join(exposed)
