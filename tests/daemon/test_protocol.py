"""The control protocol, the socket server's access rules and the sd_notify sender, in-process."""

from __future__ import annotations

import os
import socket
import time

import pytest

from lorad.daemon import protocol
from lorad.daemon.control import Access, ControlServer, Peer
from lorad.daemon.systemd import Notifier


def test_decode_request_rejects_what_is_not_a_known_command():
    assert protocol.decode_request(b'{"command": "status"}') == {"command": "status"}
    for line, why in (
        (b"{", "malformed JSON"),
        (b'"status"', "JSON object"),
        (b"{}", '"command"'),
        (b'{"command": "rm"}', "unknown command"),
        (b"\xff\xfe", "malformed JSON"),
    ):
        with pytest.raises(protocol.ProtocolError, match=why):
            protocol.decode_request(line)


def test_access_allows_root_self_listed_uids_and_group_members():
    import grp

    access = Access(allowed_uids=(1234,))
    assert access.allows(Peer(1, 0, 0))
    assert access.allows(Peer(1, os.getuid(), 0))
    assert access.allows(Peer(1, 1234, 99))
    assert not access.allows(Peer(1, 4321, 4321))
    group = grp.getgrgid(0).gr_name
    assert Access(allowed_group=group).allows(Peer(1, 4321, 0))  # primary gid
    assert not Access(allowed_group="no-such-group-here").allows(Peer(1, 4321, 0))


def test_server_answers_and_survives_a_failing_handler(tmp_path):
    def handler(request, peer, gone):
        if request["command"] == "jobs":
            raise RuntimeError("boom")
        return {"ok": True, "uid": peer.uid}

    path = tmp_path / "s.sock"
    server = ControlServer(path, handler, Access())
    server.start()
    try:
        assert protocol.request(path, "status")["uid"] == os.getuid()
        r = protocol.request(path, "jobs")
        assert r["ok"] is False and "boom" in r["error"]
        assert protocol.request(path, "status")["ok"] is True
        assert oct(path.stat().st_mode & 0o777) == "0o660"
    finally:
        server.stop()
    assert not path.exists()
    with pytest.raises(protocol.DaemonUnavailable, match="no lorad daemon"):
        protocol.request(path, "status")


def test_status_is_answered_while_another_client_is_slow(tmp_path):
    """A client that connects and sends nothing does not hold up the others."""
    path = tmp_path / "s.sock"
    server = ControlServer(path, lambda r, p, gone: {"ok": True}, Access(), client_timeout=5)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.connect(str(path))
            t0 = time.monotonic()
            assert protocol.request(path, "status")["ok"]
            assert time.monotonic() - t0 < 1.0
    finally:
        server.stop()


def test_notifier_is_a_noop_without_notify_socket():
    n = Notifier({})
    assert n.notify("READY=1") is False
    assert n.ping() is False


def test_notifier_sends_to_an_abstract_socket_and_paces_watchdog():
    name = f"lorad-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(1)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
        assert n.watchdog_interval == 1.0
        assert n.ready("up")
        assert s.recv(100) == b"READY=1\nSTATUS=up"
        assert n.ping(now=100.0) and not n.ping(now=100.5) and n.ping(now=101.0)
        assert s.recv(100) == b"WATCHDOG=1" and s.recv(100) == b"WATCHDOG=1"


def test_watchdog_is_off_for_another_pid_or_when_disabled():
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000"}, watchdog=False).watchdog_interval is None


def test_clients_beyond_the_thread_limit_wait_instead_of_being_refused(tmp_path):
    import threading

    gate = threading.Event()

    def handler(request, peer, gone):
        gate.wait(5)
        return {"ok": True}

    path = tmp_path / "s.sock"
    server = ControlServer(path, handler, Access(), max_clients=2)
    server.start()
    answers = []
    try:
        threads = [
            threading.Thread(target=lambda: answers.append(protocol.request(path, "status", timeout=10)))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert answers == []  # two being served, four queued
        gate.set()
        for t in threads:
            t.join(10)
    finally:
        server.stop()
    assert answers == [{"ok": True}] * 6


def test_every_command_of_the_table_has_its_handler_where_the_table_says():
    from lorad.daemon.service import Service

    for name, command in protocol.COMMANDS.items():
        assert command.where in ("memory", "reader", "ingest", "main", "release"), name
        assert command.where == "release" or callable(getattr(Service, f"_on_{name}", None)), name


def test_arguments_are_parsed_into_their_dataclass_or_refused_naming_the_argument():
    assert protocol.parse_arguments({"command": "jobs"}) == protocol.JobsArguments(limit=20)
    assert protocol.parse_arguments({"command": "rollback", "version": None}).version is None
    refusals = [
        ("jobs", "limit", 0, "jobs: limit must be a positive integer, got 0"),
        ("jobs", "limit", True, "jobs: limit must be an integer, got True"),
        ("promote", "version", 7, "promote: version must be a string or null, got 7"),
        ("feedback", "record", [], "feedback: record must be a JSON object, got []"),
    ]
    for name, key, value, message in refusals:
        with pytest.raises(protocol.BadArguments) as e:
            protocol.parse_arguments({"command": name, key: value})
        assert str(e.value) == message
    with pytest.raises(protocol.BadArguments, match='cancel: needs "job_id"'):
        protocol.parse_arguments({"command": "cancel"})
