"""What the test servers that speak a serving API (vLLM, Ollama) share: a quiet JSON request
handler, a ThreadingHTTPServer on a free loopback port that serves in a thread while entered,
and the hostile ones: a reply dripped a byte at a time, a huge body."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    """A handler that logs nothing and answers JSON (or a string, or nothing)."""

    def log_message(self, *a):
        pass

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, code: int, payload) -> None:
        data = b"" if payload is None else (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @property
    def stopping(self) -> threading.Event:
        """Set when the server is leaving: a handler that waits or drips ends then."""
        return self.server.stopping


class DrippingHandler(JsonHandler):
    """Answers every request one byte every ``interval`` seconds, for ever (until the client
    leaves or the server stops): in the body after whole headers, or in the headers themselves."""

    interval = 1.0
    where = "body"

    @classmethod
    def every(cls, interval: float, where: str = "body") -> type[DrippingHandler]:
        return type("Dripping", (cls,), {"interval": interval, "where": where})

    def _drip(self):
        self.read_body()
        head = b"HTTP/1.1 200 OK\r\n"
        if self.where == "body":
            head += b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
        else:
            head += b"X-Drip: "
        try:
            self.wfile.write(head)
            self.wfile.flush()
            while not self.stopping.wait(self.interval):
                self.wfile.write(b" ")
                self.wfile.flush()
        except OSError:
            pass  # the client gave up
        self.close_connection = True

    do_GET = do_POST = do_HEAD = do_DELETE = _drip


def huge_body_handler(size: int, declared: bool = True) -> type[JsonHandler]:
    """A handler answering ``size`` bytes of JSON-looking body to any GET (with a Content-Length,
    or chunked without one), streamed, never built whole."""

    class Huge(JsonHandler):
        protocol_version = "HTTP/1.1"  # chunked needs it

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header(
                "Content-Length" if declared else "Transfer-Encoding", str(size) if declared else "chunked"
            )
            self.end_headers()
            chunk, sent = b"[" + b"0," * (1 << 15), 0
            try:
                while sent < size and not self.stopping.is_set():
                    piece = chunk[: size - sent]
                    self.wfile.write(piece if declared else b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                if not declared:
                    self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the client refused the rest
            self.close_connection = True

    return Huge


class FakeServer:
    """``handler`` served on 127.0.0.1 (``url``) from a thread, between __enter__ and __exit__.

    Args:
        tls: a server-side SSLContext: serve https.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.stopping = threading.Event()
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
