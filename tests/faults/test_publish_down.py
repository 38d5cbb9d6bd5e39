"""The publish target down while the daemon promotes: a vLLM server answering 503, and one not
listening at all. The hook retries with exponential back-off, the failure is recorded (audit
event publish_failed), status keeps answering during the retries, and the daemon stays up. A
required hook that fails puts `current` back where it was."""

from __future__ import annotations

import itertools
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorad.buffer.store import Buffer
from lorad.release.registry import Registry

BACKOFF = 0.3
RETRIES = 3


class Unavailable(BaseHTTPRequestHandler):
    """A vLLM server that is up but failing: every request gets 503, and is timed."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.server.seen.append((time.monotonic(), self.path))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error": "model is loading"}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, name="http-503", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def make_versions(state: Path, model: Path) -> tuple[str, str]:
    """Two real adapter versions: the first promoted (serving), the second not."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    registry = Registry(state / "adapters", keep=5, keep_best=True)
    names = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        m.save_pretrained(state.parent / f"adapter-{seed}")
        names.append(registry.create(state.parent / f"adapter-{seed}", {"base_model": str(model)}).name)
    registry.promote(names[0], reason="serving before the test")
    return names[0], names[1]


def publish_config(url_503: str, url_closed: str, required: bool) -> str:
    tables = ""
    for url in (url_503, url_closed):
        tables += (
            f'[[publish]]\nkind = "vllm"\nurl = "{url}"\nretries = {RETRIES}\nbackoff = {BACKOFF}\n'
            f"timeout = 2.0\nrequired = {'true' if required else 'false'}\n"
        )
    return tables


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_publish_target_down_retries_with_backoff_records_the_failure_and_daemon_stays_healthy(
    daemon_factory, short_root, store, tiny_model, failing_server
):
    from daemon_helpers import config_text

    state = short_root / "state"
    serving, candidate = make_versions(state, tiny_model)
    url_503 = f"http://127.0.0.1:{failing_server.server_address[1]}"
    url_closed = f"http://127.0.0.1:{closed_port()}"
    base = config_text(short_root, store)
    d = daemon_factory(config=base + publish_config(url_503, url_closed, required=False))

    # Status keeps answering while the main loop waits on the hooks' retries.
    latencies: list[float] = []
    stop = threading.Event()

    def poll_status():
        while not stop.is_set():
            t = time.monotonic()
            assert d.request("status", timeout=10)["ok"]
            latencies.append(time.monotonic() - t)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_status, name="status-poller")
    poller.start()
    try:
        t0 = time.monotonic()
        answer = d.request("promote", version=candidate, timeout=120)
        took = time.monotonic() - t0
    finally:
        stop.set()
        poller.join(30)

    assert answer["ok"] is True, answer  # not required: the promotion stands, the failure is reported
    results = answer["publish"]["results"]
    assert [r["ok"] for r in results] == [False, False], results
    assert f"(after {RETRIES + 1} attempts)" in results[0]["detail"] and "503" in results[0]["detail"]
    assert f"(after {RETRIES + 1} attempts)" in results[1]["detail"]
    # The 503 server saw every attempt, each gap at least the doubling back-off.
    times = [t for t, path in failing_server.seen if path == "/v1/load_lora_adapter"]
    assert len(times) == RETRIES + 1
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for k, gap in enumerate(gaps):
        assert gap >= BACKOFF * 2**k * 0.95, gaps
    assert took >= 2 * sum(BACKOFF * 2**k for k in range(RETRIES)) * 0.95  # both hooks backed off
    assert latencies and max(latencies) < 2.0, max(latencies)

    with Buffer(state / "buffer.sqlite3", readonly=True) as b:
        recorded = b.events("publish_failed")
    assert len(recorded) == 2 and {e["version"] for e in recorded} == {candidate}
    assert os.readlink(state / "adapters" / "current") == candidate
    status = d.request("status")
    assert status["ok"] and status["active_version"] == candidate and d.proc.poll() is None

    # Required hooks: the same failure now undoes the change.
    d.config.write_text(base + publish_config(url_503, url_closed, required=True))
    assert d.request("reload")["ok"]
    answer = d.request("rollback", version=serving, timeout=120)
    assert answer["publish"]["reverted"] is not None, answer
    assert "required publish hook failed" in answer["publish"]["reverted"]["reason"]
    assert os.readlink(state / "adapters" / "current") == candidate
    assert d.request("status")["active_version"] == candidate
    assert Registry(state / "adapters", keep=5, keep_best=True).verify(candidate) == []
    assert d.proc.poll() is None


class Hanging(BaseHTTPRequestHandler):
    """A server that accepts a request and never answers (a hung vLLM)."""

    def do_POST(self):  # noqa: N802
        self.server.seen.append((time.monotonic(), self.path))
        self.server.release.wait(30)

    def log_message(self, *args):
        pass


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_main_loop_keeps_pinging_the_watchdog_while_a_hung_publish_target_times_out(
    daemon_factory, short_root, store, tiny_model
):
    """systemd kills a daemon whose watchdog pings stop for WatchdogSec; a promote whose hook
    waits on a hung server (timeout x attempts) must not stop them."""
    import socket

    from daemon_helpers import config_text

    state = short_root / "state"
    _, candidate = make_versions(state, tiny_model)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hanging)
    server.seen, server.release = [], threading.Event()
    thread = threading.Thread(target=server.serve_forever, name="http-hung", daemon=True)
    thread.start()
    path = short_root / "notify.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(0.1)
            hook = (
                f'[[publish]]\nkind = "vllm"\nurl = "http://127.0.0.1:{server.server_address[1]}"\n'
                "retries = 1\nbackoff = 0.2\ntimeout = 1.5\n"
            )
            d = daemon_factory(
                config=config_text(short_root, store) + hook,
                start=False,
                env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"},
            )
            d.start()
            pings: list[float] = []
            done: list[dict] = []
            promote = threading.Thread(
                target=lambda: done.append(d.request("promote", version=candidate, timeout=60)), name="promote"
            )
            promote.start()
            try:
                while promote.is_alive():
                    try:
                        if b"WATCHDOG=1" in sock.recv(4096):
                            pings.append(time.monotonic())
                    except TimeoutError:
                        pass
            finally:
                promote.join(60)
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert done and done[0]["ok"] and done[0]["publish"]["results"][0]["ok"] is False, done
    assert len(server.seen) == 2  # both attempts reached the hung server and timed out
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert pings and max(gaps) < 1.0, f"watchdog silent for {max(gaps):.1f} s (WatchdogSec=1 s)"
