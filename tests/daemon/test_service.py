"""The daemon as a real subprocess: watcher, status, control socket, signals, sd_notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3

import pytest
from daemon_helpers import Daemon, as_uid, write_artifact

from lorad.daemon import protocol


def artifacts(d) -> int:
    return d.request("status")["buffer"]["artifacts"]


def test_files_written_to_the_store_appear_in_status(daemon_factory, store):
    d = daemon_factory()
    r = d.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["buffer"]["artifacts"] == 102
    assert status["torch_loaded"] is False
    write_artifact(store)
    write_artifact(store)
    d.wait_for(lambda: artifacts(d) == 104, timeout=5, what="two new artifacts in status")
    text = d.cli("status")
    assert "104 artifacts" in text.stdout


def test_startup_reconciliation_catches_files_written_while_the_daemon_was_off(daemon_factory, store):
    d = daemon_factory()
    assert artifacts(d) == 102
    assert d.stop() == 0, d.log_text()
    ids = [write_artifact(store) for _ in range(3)]
    d.start()  # ready only after the reconciliation scan
    assert artifacts(d) == 105
    assert any(e.get("event") == "store_reconciled" and e.get("new") == 3 for e in d.events()), ids


def test_client_without_daemon_says_so_and_exits_nonzero(daemon_factory):
    d = daemon_factory(start=False)
    r = d.cli("status")
    assert r.returncode == 69
    assert "no lorad daemon is running" in r.stderr


def test_malformed_unknown_and_oversized_requests_get_errors_and_daemon_keeps_serving(daemon_factory):
    d = daemon_factory()

    def raw(payload: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(d.socket))
            try:
                s.sendall(payload)
            except BrokenPipeError:
                pass
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    assert raw(b"{not json\n")["ok"] is False
    assert "malformed JSON" in raw(b"{not json\n")["error"]
    assert "must be a JSON object" in raw(b"[1, 2]\n")["error"]
    assert "unknown command" in raw(b'{"command": "format_disk"}\n')["error"]
    huge = raw(b'{"command": "status", "pad": "' + b"x" * (protocol.MAX_REQUEST + 10) + b'"}\n')
    assert huge["ok"] is False and "over" in huge["error"]
    # a client that connects and sends nothing, then goes away
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(d.socket))
    assert d.request("status")["ok"] is True
    assert d.proc.poll() is None


def test_feedback_is_validated_and_acknowledged_after_commit(daemon_factory):
    d = daemon_factory()
    r = d.cli(
        "feedback",
        "--id",
        "fb1",
        "--prompt",
        "Write add(a, b).",
        "--completion",
        "def add(a, b): return a + b",
        "--status",
        "accepted",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"] == "new"
    with sqlite3.connect(d.root / "state" / "buffer.sqlite3") as db:  # committed before the answer
        assert db.execute("SELECT status FROM artifacts WHERE source = 'feedback' AND locator = 'fb1'").fetchall() == [
            ("accepted",)
        ]
    again = d.cli(
        "feedback",
        json.dumps(
            {
                "id": "fb1",
                "prompt": "Write add(a, b).",
                "completion": "def add(a, b): return a + b",
                "status": "accepted",
            }
        ),
    )
    assert again.returncode == 0 and "unchanged" in again.stdout
    flipped = [
        "feedback",
        "--id",
        "fb1",
        "--prompt",
        "Write add(a, b).",
        "--completion",
        "def add(a, b): return a + b",
        "--status",
        "rejected",
    ]
    conflict = d.cli(*flipped)
    assert conflict.returncode == 65, conflict.stderr
    assert "conflicts with the record stored under that id" in conflict.stderr and "--update" in conflict.stderr
    other = {"id": "fb1", "prompt": "p", "completion": "c", "status": "accepted"}
    r = d.request("feedback", record=other)
    assert (r["ok"], r["conflict"]) == (False, True)
    assert (
        d.request("feedback", record=other, update="yes")["error"]
        == "feedback: update must be true or false, got 'yes'"
    )
    updated = d.cli(*flipped, "--update")
    assert updated.returncode == 0 and "(rejected, updated)" in updated.stdout, updated.stderr
    with sqlite3.connect(d.root / "state" / "buffer.sqlite3") as db:
        assert db.execute("SELECT status FROM artifacts WHERE source = 'feedback' AND locator = 'fb1'").fetchall() == [
            ("rejected",)
        ]
    bad = d.cli("feedback", "--id", "fb2", "--completion", "x")
    assert bad.returncode == 1
    assert "prompt" in bad.stderr
    d.wait_for(lambda: artifacts(d) == 103, what="status to count the feedback")


def test_hostile_feedback_and_jobs_requests_are_answered_with_a_reason_not_an_internal_error(daemon_factory):
    """Issue 23: a lone surrogate in a feedback record and a jobs limit of 10**20 were
    "internal error: UnicodeEncodeError" / "OverflowError"; a NaN score was stored "rejected"."""
    d = daemon_factory()

    def raw(line: str) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(d.socket))
            s.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    surrogate = raw(
        '{"command": "feedback", "record": {"id": "s1", "prompt": "p\\ud800", "completion": "c", "status": "accepted"}}'
    )
    assert surrogate["ok"] is False and "lone surrogate" in surrogate["error"], surrogate
    nan = raw('{"command": "feedback", "record": {"id": "n1", "prompt": "p", "completion": "c", "score": NaN}}')
    assert nan["ok"] is False and "score: must be a finite number" in nan["error"], nan
    with sqlite3.connect(d.root / "state" / "buffer.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM artifacts WHERE source = 'feedback'").fetchone() == (0,)
    d.request("train_now")
    listed = d.request("jobs", limit=10**20)
    assert listed["ok"] is True and len(listed["jobs"]) == 1, listed
    r = d.cli("jobs", "--limit", str(10**20))
    assert r.returncode == 0 and listed["jobs"][0]["job_id"] in r.stdout, r.stderr
    zero = d.cli("jobs", "--limit", "0")
    assert zero.returncode == 2 and "--limit: must be a positive integer, got 0" in zero.stderr, zero.stderr
    assert not any("internal error" in line for line in d.log_text().splitlines())


def test_pause_and_resume_scheduled_training_persist_across_restart(daemon_factory):
    d = daemon_factory()
    assert d.cli("pause").returncode == 0
    assert d.request("status")["scheduling_paused"] is True
    d.stop()
    d.start()
    assert d.request("status")["scheduling_paused"] is True
    assert "paused" in d.cli("status").stdout
    assert d.cli("resume").returncode == 0
    assert d.request("status")["scheduling_paused"] is False


def test_sighup_with_a_bad_config_keeps_the_old_one(daemon_factory, short_root, store):
    d = daemon_factory(schedule={"min_new_examples": 7})
    good = d.config.read_text()
    d.config.write_text(good.replace("min_new_examples = 7", "min_new_examples = -3"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for(lambda: any(e.get("event") == "config_reload_refused" for e in d.events()), what="refusal")
    status = d.request("status")
    assert status["schedule"]["min_new_examples"] == 7
    assert d.proc.poll() is None
    r = d.request("reload")  # the socket route says why
    assert r["ok"] is False and "schedule.min_new_examples" in r["error"]
    assert d.cli("reload").returncode == 78  # the client reads the same bad file first
    d.config.write_text(good.replace("min_new_examples = 7", "min_new_examples = 9"))
    assert d.cli("reload").returncode == 0
    assert d.request("status")["schedule"]["min_new_examples"] == 9


def test_sd_notify_ready_status_watchdog_and_stopping(daemon_factory, short_root):
    path = short_root / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        d = daemon_factory(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}, start=False)
        d.start()
        messages = []

        def drain():
            try:
                while True:
                    messages.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
            return messages

        d.wait_for(lambda: sum("WATCHDOG=1" in m for m in drain()) >= 3, timeout=5, what="watchdog pings")
        ready = [m for m in messages if "READY=1" in m]
        assert ready, messages
        assert "STATUS=" in ready[0]
        assert messages.index(ready[0]) == 0  # nothing before READY=1
        d.stop()
        drain()
        assert any("STOPPING=1" in m for m in messages)


def test_peer_without_permission_is_refused_and_logged(daemon_factory, short_root):
    if os.getuid() != 0:  # only root can become another uid; Access rules are unit-tested in test_protocol.py
        pytest.skip("needs root to run a client as another uid")
    d = daemon_factory()
    os.chmod(d.socket, 0o666)  # let the file permission pass so the peer-credential check decides

    def as_nobody() -> dict:
        return as_uid(65534, 65534, lambda: protocol.request(d.socket, "status", timeout=5))

    refused = as_nobody()
    assert refused.get("ok") is False and "not allowed" in refused["error"], refused
    assert any(e.get("event") == "client_refused" and e.get("uid") == 65534 for e in d.events())
    # allowed_uids lets the same uid in
    d.config.write_text(d.config.read_text().replace("[daemon]", "[daemon]\nallowed_uids = [65534]", 1))
    assert d.cli("reload").returncode == 0
    allowed = as_nobody()
    assert allowed.get("ok") is True, allowed


def test_socket_is_mode_0660(daemon_factory):
    d = daemon_factory()
    assert oct(os.stat(d.socket).st_mode & 0o777) == oct(0o660)


def test_sigterm_stops_cleanly_and_removes_the_socket(daemon_factory):
    d = daemon_factory()
    assert d.stop() == 0
    assert not d.socket.exists()
    assert any(e.get("event") == "daemon_stopped" for e in d.events())


def test_second_daemon_on_the_same_socket_refuses_to_start(daemon_factory, short_root, store):
    d = daemon_factory()
    other = Daemon(short_root, d.config.read_text())
    other.log_path = short_root / "other.log"
    other.start(wait=False)
    assert other.proc.wait(30) == 1
    other._log.close()
    other.proc = None
    assert d.request("status")["ok"]


def test_promote_and_rollback_go_through_the_running_daemon(daemon_factory, short_root):
    from lorad.release.registry import Registry

    d = daemon_factory()
    adapter = short_root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    reg = Registry(d.root / "state" / "adapters")
    v1 = reg.create(adapter, {"verdict": {"promote": True, "reasons": []}}).name
    v2 = reg.create(adapter, {"verdict": {"promote": False, "reasons": ["worse"]}}).name
    r = d.cli("promote", v1)
    assert r.returncode == 0, r.stderr
    r = d.cli("promote", "2", "--reason", "by hand after review")
    assert r.returncode == 0, r.stderr
    assert d.request("status")["active_version"] == v2
    handled = [e for e in d.events() if e.get("event") == "control_command_received"]
    assert [e["command"] for e in handled] == ["promote", "promote"]
    r = d.cli("rollback")
    assert r.returncode == 0, r.stderr
    assert d.request("status")["active_version"] == v1
    bad = d.cli("promote", "v0099")
    assert bad.returncode == 1 and "v0099" in bad.stderr
    history = d.request("history")
    assert history["current"] == v1 and [v["version"] for v in history["versions"]] == [v2, v1]
    # One view: the socket answers what `lorad history --json` prints.
    printed = json.loads(d.cli("history", "--json").stdout)
    assert {k: v for k, v in history.items() if k != "ok"} == printed


def test_a_version_named_with_a_non_ascii_digit_is_no_such_version_through_the_daemon(daemon_factory, short_root):
    """promote '²' answered "internal error: ValueError"."""
    from lorad.release.registry import Registry

    d = daemon_factory()
    adapter = short_root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    Registry(d.root / "state" / "adapters").create(adapter, {"verdict": {"promote": True, "reasons": []}})
    for command in ("promote", "rollback"):
        answer = d.request(command, version="²")
        assert answer["ok"] is False and "no adapter version '²'" in answer["error"], answer
        r = d.cli(command, "²")
        assert r.returncode == 1 and "no adapter version '²'" in r.stderr and "internal error" not in r.stderr
