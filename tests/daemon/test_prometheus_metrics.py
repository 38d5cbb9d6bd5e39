"""Prometheus metrics of a real `lorad serve`: /metrics on metrics.listen, the textfile, bad values."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest
from daemon_helpers import WORKER_ENV, config_text, training_sections, write_artifact
from prometheus_client.parser import text_string_to_metric_families

from lorad import config
from lorad.daemon import metrics
from lorad.daemon.metrics import Metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(text: str) -> dict:
    """{(name, ((label, value), ...)): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return samples(resp.read().decode())


def test_metrics_are_served_and_change_after_an_ingest(daemon_factory, short_root, store):
    port = free_port()
    textfile = short_root / "textfile" / "lorad.prom"
    textfile.parent.mkdir()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}", "textfile": str(textfile)})
    source = f"atomicguard:{store}"
    before = scrape(port)
    artifacts = before[("lorad_buffer_artifacts", ())]
    assert artifacts == d.request("status")["buffer"]["artifacts"] > 0
    assert before[("lorad_artifacts_ingested_total", (("source", source),))] == artifacts  # the start-up scan
    assert before[("lorad_artifacts_quarantined_total", (("source", source),))] == 0
    assert before[("lorad_scheduler_state", (("lorad_scheduler_state", "idle"),))] == 1
    assert before[("lorad_active_version_info", (("version", "none"),))] == 1
    assert before[("lorad_jobs_total", (("state", "promoted"),))] == 0
    assert before[("lorad_promotions_total", ())] == before[("lorad_rollbacks_total", ())] == 0
    assert before[("lorad_cycle_duration_seconds_count", ())] == 0
    assert ("lorad_buffer_examples", (("split", "train"),)) in before
    assert before[("process_resident_memory_bytes", ())] < 100e6  # the daemon stays under 100 MB
    assert d.request("status")["torch_loaded"] is False

    write_artifact(store)
    (store / "objects" / "zz").mkdir(exist_ok=True)
    (store / "objects" / "zz" / "broken.json").write_text("{not json")
    after = d.wait_for(
        lambda: (
            (m := scrape(port))[("lorad_buffer_artifacts", ())] == artifacts + 1
            and m[("lorad_artifacts_quarantined_total", (("source", source),))] == 1
            and m
        ),
        timeout=20,
        what="the ingest in the metrics",
    )
    assert after[("lorad_artifacts_ingested_total", (("source", source),))] == artifacts + 1

    # The textfile was written at start (no process_* metrics: node_exporter has its own).
    written = samples(textfile.read_text())
    assert written[("lorad_buffer_artifacts", ())] == artifacts
    assert not [k for k in written if k[0].startswith("process_")]
    assert [p.name for p in textfile.parent.iterdir()] == ["lorad.prom"]


def test_a_stalled_scrape_does_not_hold_up_the_daemon(daemon_factory):
    port = free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"})
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]  # connect, never send
    try:
        for sock in stalled:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # a request line, and no more
        begun = time.monotonic()
        assert d.request("status", timeout=5)["ok"]
        assert scrape(port)[("lorad_scheduler_state", (("lorad_scheduler_state", "idle"),))] == 1
        assert time.monotonic() - begun < 3
    finally:
        for sock in stalled:
            sock.close()


def half_sent(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that send a request line and nothing more (a refused one is kept too)."""
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        except OSError:
            pass  # already closed by the listener: it holds only so many
        socks.append(sock)
    return socks


def test_half_sent_requests_hold_no_thread_and_a_scrape_still_answers():
    """1,000 connections that never finish their request cost neither a thread each nor a
    scrape its answer; the listener holds a bounded number of them."""
    port = free_port()
    m = Metrics(lambda: {"state": "idle"}, ["s"])
    threads = threading.active_count()
    m.listen("127.0.0.1", port)
    stalled = []
    try:
        stalled = half_sent(port, 1000)
        assert threading.active_count() - threads <= 8
        begun = time.monotonic()
        assert scrape(port)[("lorad_scheduler_state", (("lorad_scheduler_state", "idle"),))] == 1
        assert time.monotonic() - begun < 2
        held = [s for s in stalled if not closed_by_peer(s)]
        assert len(held) <= metrics.MAX_CONNECTIONS
    finally:
        for sock in stalled:
            sock.close()
        m.stop()


def closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_a_request_that_trickles_in_is_closed_at_its_deadline():
    """The whole request head must arrive within the deadline, however the bytes trickle."""
    port = free_port()
    m = Metrics(lambda: {"state": "idle"}, ["s"])
    m.listen("127.0.0.1", port, request_seconds=1.0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            begun = time.monotonic()
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            with pytest.raises(OSError):
                for _ in range(50):  # 10 s of a header line every 0.2 s
                    sock.sendall(b"X-Drip: 1\r\n")
                    time.sleep(0.2)
                    if closed_by_peer(sock):
                        raise ConnectionResetError("closed")
            assert 0.9 < time.monotonic() - begun < 3
        assert scrape(port)[("lorad_scheduler_state", (("lorad_scheduler_state", "idle"),))] == 1
    finally:
        m.stop()


def test_a_flood_of_half_sent_scrapes_does_not_starve_the_daemon(daemon_factory):
    """The issue's run: 1,200 half-sent requests held 1,227 threads and status slowed to seconds."""
    port = free_port()
    d = daemon_factory(metrics={"listen": f"127.0.0.1:{port}"})
    stalled = half_sent(port, 1200)
    try:
        begun = time.monotonic()
        assert d.request("status", timeout=5)["ok"]
        assert scrape(port)[("lorad_scheduler_state", (("lorad_scheduler_state", "idle"),))] == 1
        assert time.monotonic() - begun < 3
        assert psutil.Process(d.proc.pid).num_threads() < 60
    finally:
        for sock in stalled:
            sock.close()
    assert d.request("status", timeout=5)["ok"]


def test_the_textfile_is_rewritten_after_a_cycle_with_its_results(daemon_factory, short_root, tiny_model):
    port = free_port()
    textfile = short_root / "lorad.prom"
    sections = training_sections(tiny_model, max_steps=6, save_steps=6, min_new_examples=1)
    d = daemon_factory(env=WORKER_ENV, metrics={"listen": f"127.0.0.1:{port}", "textfile": str(textfile)}, **sections)
    first = textfile.stat().st_ino
    old = short_root / "old.prom"
    os.link(textfile, old)  # the file as it was: a rewrite in place would change it too
    old_text = old.read_text()
    job = d.wait_for(
        lambda: [j for j in d.request("jobs")["jobs"] if j["state"] in ("promoted", "rejected", "failed")],
        timeout=240,
        what="a finished cycle",
    )[0]
    assert job["state"] == "promoted", job["reason"]
    m = d.wait_for(
        lambda: (m := samples(textfile.read_text()))[("lorad_jobs_total", (("state", "promoted"),))] == 1 and m,
        timeout=10,
        what="the textfile after the cycle",
    )
    assert textfile.stat().st_ino != first and old.read_text() == old_text  # replaced by a rename, whole
    assert m[("lorad_promotions_total", ())] == 1
    assert m[("lorad_active_version_info", (("version", job["version"]),))] == 1
    assert m[("lorad_heldout_nll", (("adapter", "active"), ("version", job["version"])))] > 0
    assert m[("lorad_heldout_nll", (("adapter", "candidate"), ("version", job["version"])))] > 0
    assert m[("lorad_last_training_tokens_per_second", ())] > 0
    assert m[("lorad_cycle_duration_seconds_count", ())] == 1 and m[("lorad_last_cycle_duration_seconds", ())] > 0
    assert m[("lorad_last_success_timestamp_seconds", ())] == pytest.approx(time.time(), abs=120)
    assert scrape(port)[("lorad_jobs_total", (("state", "promoted"),))] == 1


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"listen": "0.0.0.0:9464"}, "metrics.listen: '0.0.0.0' is not a loopback address; set metrics.allow_remote"),
        ({"listen": "[::]:9464"}, "metrics.listen: '::' is not a loopback address"),
        ({"listen": "9464"}, 'metrics.listen: must be "HOST:PORT"'),
        ({"listen": "127.0.0.1:99999"}, 'metrics.listen: must be "HOST:PORT"'),
        ({"listen": 9464}, "metrics.listen: must be a string"),
        ({"textfile": "lorad.prom"}, "metrics.textfile: must be an absolute path"),
        (
            {"textfile": "/var/lib/node_exporter/lorad.txt"},
            "metrics.textfile: node_exporter reads only files named *.prom",
        ),
        ({"listen_on": "x"}, "metrics.listen_on: unknown key"),
    ],
)
def test_bad_metrics_values_are_refused_naming_the_key(keys, message):
    text = "[metrics]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in keys.items())
    with pytest.raises(config.ConfigError) as e:
        config.loads(text)
    assert message in str(e.value)


def test_loopback_is_accepted_and_a_remote_address_only_when_allowed():
    assert config.loads('[metrics]\nlisten = "localhost:9464"\n').metrics.port == 9464
    assert config.loads('[metrics]\nlisten = "[::1]:9464"\n').metrics.host == "::1"
    s = config.loads('[metrics]\nlisten = "0.0.0.0:9464"\nallow_remote = true\n')
    assert (s.metrics.host, s.metrics.port) == ("0.0.0.0", 9464)
    assert config.Settings().metrics.listen == "" and config.Settings().metrics.textfile == ""


def test_serve_exits_78_on_a_bad_metrics_value_and_1_on_a_port_taken(short_root, store):
    cfg = short_root / "config.toml"
    cfg.write_text(config_text(short_root, store, metrics={"listen": "0.0.0.0:9464"}))
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 78
    assert "metrics.listen: '0.0.0.0' is not a loopback address" in proc.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg.write_text(config_text(short_root, store, metrics={"listen": f"127.0.0.1:{taken.getsockname()[1]}"}))
        proc = subprocess.run(
            [sys.executable, "-m", "lorad", "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 1
    assert "metrics.listen: cannot listen on 127.0.0.1" in proc.stdout + proc.stderr
