"""A test server that speaks vLLM's sleep endpoints (--enable-sleep-mode, VLLM_SERVER_DEV_MODE=1:
/sleep, /wake_up, /is_sleeping) and its runtime LoRA ones, in a thread of the test process."""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import urlsplit

from fake_http import FakeServer, JsonHandler


class SleepyVllm(FakeServer):
    """vLLM with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (and --enable-lora).

    Args:
        wake_failures: how many /wake_up requests answer 503 first (-1: every one).
        sleep_mode: False answers 404 on the sleep endpoints, as vLLM without VLLM_SERVER_DEV_MODE.
        sleeping: the state it starts in.
        broken: path -> a broken answer (a key of ``BROKEN``): a request to that path changes
            nothing and gets that answer instead. Clear it and the server behaves again.
    """

    BROKEN = {
        "cut": None,  # Content-Length 100, ten bytes, then the connection closes (IncompleteRead)
        "nested": "[" * 100_000 + "]" * 100_000,  # past the JSON parser's recursion limit
        "list": "[true]",
        "garbage": "<html>Bad Gateway</html>",
    }

    def __init__(
        self,
        wake_failures: int = 0,
        sleep_mode: bool = True,
        sleeping: bool = False,
        broken: dict[str, str] | None = None,
    ):
        self.sleeping = sleeping
        self.wake_failures = wake_failures
        self.sleep_mode = sleep_mode
        self.broken = dict(broken or {})
        self.loaded: dict[str, str] = {}
        self.log: list[tuple[float, str, str]] = []  # (time, method, path)
        self.lock = threading.Lock()
        fake = self

        class Handler(JsonHandler):
            def answered_brokenly(self) -> bool:
                how = fake.broken.get(urlsplit(self.path).path)
                if how is None:
                    return False
                if how == "cut":
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b'{"is_sleep')
                    self.close_connection = True
                else:
                    self.reply(200, fake.BROKEN[how])
                return True

            def do_GET(self):
                fake.log.append((time.time(), "GET", self.path))
                if self.answered_brokenly():
                    return
                if self.path == "/is_sleeping" and fake.sleep_mode:
                    return self.reply(200, {"is_sleeping": fake.sleeping})
                return self.reply(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.read_body() or b"{}")
                fake.log.append((time.time(), "POST", self.path))
                if self.answered_brokenly():
                    return
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

        super().__init__(Handler)

    def calls(self) -> list[str]:
        return [f"{m} {p}" for _, m, p in self.log]
