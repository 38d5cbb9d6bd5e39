"""lorad.release.http_client against hostile servers in the test: long, huge, cut and dripping replies,
a silent one, and a cancel from another thread; and its retry rule: a 4xx is final, a 5xx or a
connection error is retried with doubling backoff."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
import tracemalloc
from typing import ClassVar

import pytest

from fake_http import DrippingHandler, FakeServer, JsonHandler, huge_body_handler
from lorad.release import http_client
from lorad.release.http_client import HttpError


def test_a_long_json_reply_comes_back_whole():
    """Not cut to 2,000 characters: an /api/tags of 59 models (10 kB) must still parse."""
    tags = {
        "models": [
            {"name": f"lorad-v{i:04d}-20261201T0300{i:02d}Z:latest", "size": 123456789, "digest": "0" * 64}
            for i in range(1, 60)
        ]
    }

    class Handler(JsonHandler):
        def do_GET(self):
            self.reply(200, tags)

    with FakeServer(Handler) as server:
        text = http_client.send(server.url, "GET", "/api/tags", timeout=5)
    assert len(text) > 4 * http_client.OUTPUT_CHARS
    assert json.loads(text) == tags


def test_an_error_reply_keeps_only_an_excerpt_in_its_message():
    class Handler(JsonHandler):
        def do_POST(self):
            self.read_body()
            self.reply(503, {"error": "x" * 50_000})

    with FakeServer(Handler) as server, pytest.raises(HttpError) as e:
        http_client.send(server.url, "POST", "/v1/load_lora_adapter", {"a": 1}, timeout=5)
    assert e.value.status == 503 and not e.value.final
    assert len(str(e.value)) < http_client.OUTPUT_CHARS + 100


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_cap_is_refused_without_being_read_whole(declared):
    """A 400 MB reply (declared, or chunked without a length): refused at the cap, in bounded memory."""
    with FakeServer(huge_body_handler(400 << 20, declared)) as server:
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(HttpError, match="over the 1 MiB cap") as e:
                http_client.send(server.url, "GET", "/api/tags", timeout=30)
            took = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert e.value.final  # asking again gets the same 400 MB
    assert peak < 4 * http_client.MAX_BODY, peak
    assert took < 5, took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["body", "headers"])
def test_a_server_dripping_a_byte_at_a_time_fails_at_the_whole_request_deadline(where):
    """Each byte comes well within ``timeout``; the request as a whole does not."""
    with FakeServer(DrippingHandler.every(0.2, where)) as server:
        started = time.monotonic()
        with pytest.raises(HttpError, match="within 1.5 s"):
            http_client.send(server.url, "GET", "/is_sleeping", timeout=1.5)
        took = time.monotonic() - started
    assert 1.4 < took < 3, took


def test_a_silent_server_fails_at_the_deadline():
    class Silent(JsonHandler):
        def do_GET(self):
            time.sleep(3)

    with FakeServer(Silent) as server:
        started = time.monotonic()
        with pytest.raises(HttpError, match="within 0.5 s") as e:
            http_client.send(server.url, "GET", "/api/tags", timeout=0.5)
    assert time.monotonic() - started < 2 and not e.value.final


def test_a_connect_that_never_completes_ends_at_the_deadline_or_at_a_cancel():
    """A listener whose accept queue is full drops the SYN: the connect waits, bounded like the rest."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address, held = listener.getsockname(), []
        try:
            for _ in range(8):
                held.append(socket.create_connection(address, timeout=0.3))
            pytest.skip("this kernel completes every connect to a full accept queue")
        except TimeoutError:
            pass
        url = f"http://127.0.0.1:{address[1]}"
        try:
            started = time.monotonic()
            with pytest.raises(HttpError, match="within 1 s"):
                http_client.send(url, "GET", "/is_sleeping", timeout=1)
            assert time.monotonic() - started < 1.5
            cancel = threading.Event()
            threading.Timer(0.3, cancel.set).start()
            started = time.monotonic()
            with pytest.raises(http_client.Cancelled):
                http_client.send(url, "GET", "/is_sleeping", timeout=30, cancel=cancel)
            assert time.monotonic() - started < 1
        finally:
            for s in held:
                s.close()


def test_a_reply_cut_short_is_an_error_that_is_retried():
    """Content-Length 100, ten bytes, then the server closes (IncompleteRead): a HttpError, not a crash."""

    class Cut(JsonHandler):
        def do_POST(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b'{"is_sleep')
            self.close_connection = True

    with FakeServer(Cut) as server, pytest.raises(HttpError, match="cut short") as e:
        http_client.send(server.url, "POST", "/wake_up", b"", timeout=5)
    assert not e.value.final


def test_a_cancel_ends_the_wait_at_once():
    class Silent(JsonHandler):
        def do_POST(self):
            time.sleep(5)

    cancel = threading.Event()
    with FakeServer(Silent) as server:
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(http_client.Cancelled) as e:
            http_client.send(server.url, "POST", "/api/create", {"model": "m"}, timeout=30, cancel=cancel)
        took = time.monotonic() - started
        # and no retry after a cancel
        waits = []
        with pytest.raises(http_client.Cancelled):
            http_client.retrying(
                lambda: http_client.send(server.url, "POST", "/x", {}, timeout=30, cancel=cancel),
                retries=3,
                backoff=1.0,
                sleep=waits.append,
                cancel=cancel,
            )
    assert e.value.final and took < 1.5, took
    assert waits == []


@pytest.fixture
def tls_files(tmp_path, monkeypatch):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command for a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what the client's default context trusts
    return cert, key


@pytest.mark.timeout(60)
def test_https_has_the_same_whole_request_deadline(tls_files):
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    class Handler(JsonHandler):
        def do_GET(self):
            self.reply(200, {"is_sleeping": False})

    with FakeServer(Handler, tls=context) as server:
        assert json.loads(http_client.send(server.url, "GET", "/is_sleeping", timeout=5)) == {"is_sleeping": False}
    with FakeServer(DrippingHandler.every(0.2, "body"), tls=context) as server:
        started = time.monotonic()
        with pytest.raises(HttpError, match="within 1.5 s"):
            http_client.send(server.url, "GET", "/is_sleeping", timeout=1.5)
        assert time.monotonic() - started < 3


def scripted(*statuses: int) -> type[JsonHandler]:
    """A handler answering the n-th request with the n-th of ``statuses`` (the last one after
    them all), a JSON body either way; ``seen`` lists the paths it was asked for."""

    class Scripted(JsonHandler):
        seen: ClassVar[list[str]] = []

        def do_POST(self):
            self.read_body()
            self.seen.append(self.path)
            code = statuses[min(len(self.seen), len(statuses)) - 1]
            self.reply(code, {"answer": len(self.seen)} if code < 300 else {"error": f"status {code}"})

        do_GET = do_POST

    return Scripted


def load_adapter(url: str, waits: list[float], retries: int = 3, backoff: float = 0.5) -> str:
    """A request as the publish hooks make it, retried; the waits between attempts recorded, not slept."""
    return http_client.retrying(
        lambda: http_client.send(url, "POST", "/v1/load_lora_adapter", {"lora_name": "v1"}, timeout=5),
        retries=retries,
        backoff=backoff,
        sleep=waits.append,
    )


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422])
def test_a_4xx_is_final_one_request_and_no_retry(status):
    """Asking again gets the same answer: the error comes back at once, as the server gave it."""
    handler, waits = scripted(status, 200), []
    with FakeServer(handler) as server, pytest.raises(HttpError) as e:
        load_adapter(server.url, waits)
    assert handler.seen == ["/v1/load_lora_adapter"] and waits == []
    assert e.value.status == status and e.value.final
    assert f"HTTP {status}" in str(e.value) and "attempts" not in str(e.value)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_is_retried_with_doubling_backoff_and_the_last_error_counts_the_attempts(status):
    handler, waits = scripted(status), []
    with FakeServer(handler) as server, pytest.raises(HttpError) as e:
        load_adapter(server.url, waits, retries=3, backoff=0.5)
    assert len(handler.seen) == 4 and waits == [0.5, 1.0, 2.0]
    assert e.value.status == status and not e.value.final
    assert f"HTTP {status}" in str(e.value) and str(e.value).endswith("(after 4 attempts)"), str(e.value)


def test_a_5xx_then_an_answer_returns_the_answer():
    handler, waits = scripted(503, 502, 200), []
    with FakeServer(handler) as server:
        assert json.loads(load_adapter(server.url, waits, retries=3, backoff=0.25)) == {"answer": 3}
    assert len(handler.seen) == 3 and waits == [0.25, 0.5]


def test_a_connection_error_is_retried_with_doubling_backoff_and_the_last_error_counts_the_attempts():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    calls, waits = [], []

    def call():
        calls.append(1)
        return http_client.send(url, "POST", "/v1/load_lora_adapter", {"lora_name": "v1"}, timeout=5)

    with pytest.raises(HttpError) as e:
        http_client.retrying(call, retries=2, backoff=0.25, sleep=waits.append)
    assert len(calls) == 3 and waits == [0.25, 0.5]
    assert e.value.status is None and not e.value.final
    assert "ConnectionRefused" in str(e.value) and str(e.value).endswith("(after 3 attempts)"), str(e.value)
