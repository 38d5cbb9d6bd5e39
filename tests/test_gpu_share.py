"""vLLM sleep/wake around the training worker, against a small HTTP server in the test that
speaks vLLM's sleep endpoints (/sleep, /wake_up, /is_sleeping) and its runtime LoRA ones."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from structlog.testing import capture_logs

from lorad import config, events, gpu_share
from lorad.buffer.jobs import JobStore
from lorad.gpu_share import GpuShare, ShareError, SleepingServer


class SleepyVllm:
    """vLLM with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (and --enable-lora).

    Args:
        wake_failures: how many /wake_up requests answer 503 first (-1: every one).
        sleep_mode: False answers 404 on the sleep endpoints, as vLLM without VLLM_SERVER_DEV_MODE.
        sleeping: the state it starts in.
    """

    def __init__(self, wake_failures: int = 0, sleep_mode: bool = True, sleeping: bool = False):
        self.sleeping = sleeping
        self.wake_failures = wake_failures
        self.sleep_mode = sleep_mode
        self.loaded: dict[str, str] = {}
        self.log: list[tuple[float, str, str]] = []  # (time, method, path)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                fake.log.append((time.time(), "GET", self.path))
                if self.path == "/is_sleeping" and fake.sleep_mode:
                    return self.reply(200, {"is_sleeping": fake.sleeping})
                return self.reply(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                fake.log.append((time.time(), "POST", self.path))
                url = urlsplit(self.path)
                with fake.lock:
                    if url.path == "/sleep" and fake.sleep_mode:
                        assert url.query == "level=1", url.query
                        fake.sleeping = True
                        return self.reply(200, "")
                    if url.path == "/wake_up" and fake.sleep_mode:
                        if fake.wake_failures:
                            fake.wake_failures -= 1 if fake.wake_failures > 0 else 0
                            return self.reply(503, {"error": "engine core busy"})
                        fake.sleeping = False
                        return self.reply(200, "")
                    if url.path == "/v1/load_lora_adapter":
                        if fake.sleeping:  # what lorad must never ask of a sleeping server
                            return self.reply(500, {"error": "engine is sleeping"})
                        fake.loaded[body["lora_name"]] = body["lora_path"]
                        return self.reply(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
                    if url.path == "/v1/unload_lora_adapter":
                        fake.loaded.pop(body["lora_name"], None)
                        return self.reply(200, "Success")
                return self.reply(404, {"detail": "Not Found"})

            def reply(self, code, payload):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def calls(self) -> list[str]:
        return [f"{m} {p}" for _, m, p in self.log]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def store(buffer):
    return JobStore(buffer.conn)


def server(fake: SleepyVllm, retries: int = 3) -> SleepingServer:
    waits: list[float] = []
    return SleepingServer(fake.url, timeout=5, retries=retries, backoff=0.5, sleep=waits.append)


def test_the_server_sleeps_while_the_body_runs_and_wakes_after_it(store):
    with SleepyVllm() as fake:
        share = GpuShare([server(fake)], store)
        with share.asleep("job-1"):
            assert fake.sleeping
            [record] = gpu_share.records(store)
            assert record["state"] == "asleep" and record["job_id"] == "job-1" and record["url"] == fake.url
        assert not fake.sleeping
        assert gpu_share.records(store) == []
        assert fake.calls() == ["POST /sleep?level=1", "GET /is_sleeping", "POST /wake_up", "GET /is_sleeping"]


def test_the_server_is_woken_when_the_body_raises(store):
    with SleepyVllm() as fake:
        with pytest.raises(RuntimeError):
            with GpuShare([server(fake)], store).asleep("job-1"):
                raise RuntimeError("the worker could not start")
        assert not fake.sleeping and gpu_share.records(store) == []


def test_a_wake_that_fails_is_retried_until_it_succeeds(store):
    with SleepyVllm(wake_failures=2) as fake:
        s = server(fake, retries=3)
        with capture_logs() as logs, GpuShare([s], store).asleep("job-1"):
            pass
        assert not fake.sleeping and gpu_share.records(store) == []
        assert fake.calls().count("POST /wake_up") == 3
        assert [e["event"] for e in logs] == [events.SERVER_SLEPT, events.SERVER_WOKEN]


def test_a_wake_that_never_succeeds_is_logged_audited_recorded_and_retried_later(buffer, store):
    with SleepyVllm(wake_failures=-1) as fake:
        with capture_logs() as logs, GpuShare([server(fake, retries=2)], store, buffer.record_event).asleep("job-1"):
            pass
        assert fake.sleeping and fake.calls().count("POST /wake_up") == 3
        [failed] = [e for e in logs if e["event"] == events.SERVER_WAKE_FAILED]
        assert failed["log_level"] == "error" and failed["url"] == fake.url and "HTTP 503" in failed["error"]
        [audit] = buffer.events(events.SERVER_WAKE_FAILED)
        assert audit["job_id"] == "job-1" and audit["detail"]["url"] == fake.url
        [record] = gpu_share.records(store)
        assert record["state"] == "wake_failed" and "after 3 attempts" in record["error"]
        states = gpu_share.server_states([], gpu_share.records(store))
        assert states == [{"url": fake.url, "state": "wake_failed", "since": record["since"], "job_id": "job-1",
                           "error": record["error"]}]

        # Later (the daemon's waker, or the next cycle): the server answers again, and is woken
        # from the record alone, with the settings the record kept.
        fake.wake_failures = 0
        assert GpuShare([], store).wake_recorded() == []
        assert not fake.sleeping and gpu_share.records(store) == []


def test_a_server_that_will_not_sleep_stops_the_worker_from_starting(store):
    with SleepyVllm(sleep_mode=False) as fake:
        ran = []
        with pytest.raises(ShareError, match="VLLM_SERVER_DEV_MODE=1"):
            with GpuShare([server(fake)], store).asleep("job-1"):
                ran.append(True)
        assert ran == []
        assert gpu_share.records(store) == []  # no sleep endpoints: it cannot be asleep


def test_an_unreachable_server_fails_the_sleep_and_stays_recorded_until_it_is_woken(store):
    with SleepyVllm() as fake:
        url = fake.url
    gone = SleepingServer(url, timeout=1, retries=1, backoff=0, sleep=lambda s: None)
    with pytest.raises(ShareError, match="after 2 attempts"):
        with GpuShare([gone], store).asleep("job-1"):
            pass
    # It may have gone to sleep before it stopped answering: the record stays for the waker.
    [record] = gpu_share.records(store)
    assert record["state"] == "wake_failed" and record["url"] == url


def test_sleep_during_training_is_only_for_vllm_hooks():
    with pytest.raises(config.ConfigError, match=r'publish\[0\].sleep_during_training: only a kind = "vllm"'):
        config.loads("[[publish]]\nargv = ['x']\nsleep_during_training = true\n")
    s = config.loads("[[publish]]\nkind = 'vllm'\nurl = 'http://127.0.0.1:8000'\nsleep_during_training = true\n"
                     "[[publish]]\nkind = 'vllm'\nurl = 'http://127.0.0.1:8001'\n")
    assert [x.url for x in gpu_share.servers_from_settings(s.publish)] == ["http://127.0.0.1:8000"]
