"""Publish hooks: a command, and vLLM's LoRA endpoints served by a small HTTP server in the test."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone

import pytest

from fake_http import FakeServer, JsonHandler
from lorad.buffer.store import Buffer
from lorad.config import PublishSettings
from lorad.release.hooks import CommandHook, VllmHook, hooks_from_settings, publish
from lorad.release.registry import Registry

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=timezone.utc)


class FakeVllm(FakeServer):
    """Speaks vLLM's runtime LoRA endpoints (--enable-lora, VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""

    def __init__(self, api_key=None, fail_first=0):
        self.loaded: dict[str, str] = {}
        self.requests: list[tuple[str, dict]] = []
        self.api_key = api_key
        self.fail_first = fail_first
        fake = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.read_body())
                fake.requests.append((self.path, body))
                if fake.fail_first > 0:
                    fake.fail_first -= 1
                    return self.reply(503, {"error": {"message": "engine busy", "code": 503}})
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self.reply(401, {"error": "Unauthorized"})
                name = body.get("lora_name")
                if self.path == "/v1/load_lora_adapter":
                    if not name or not body.get("lora_path"):
                        return self.reply(
                            400, {"error": {"message": "Both 'lora_name' and 'lora_path' must be provided."}}
                        )
                    if name in fake.loaded:
                        return self.reply(
                            400, {"error": {"message": f"The lora adapter '{name}' has already been loaded."}}
                        )
                    fake.loaded[name] = body["lora_path"]
                    return self.reply(200, f"Success: LoRA adapter '{name}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    if name not in fake.loaded:
                        return self.reply(404, {"error": {"message": f"The lora adapter '{name}' cannot be found."}})
                    del fake.loaded[name]
                    return self.reply(200, f"Success: LoRA adapter '{name}' removed successfully.")
                return self.reply(404, {"detail": "Not Found"})

        super().__init__(Handler)


@pytest.fixture
def reg(tmp_path):
    reg = Registry(tmp_path / "adapters")
    for i in (1, 2):
        d = tmp_path / f"a{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(bytes([i]) * 16)
        reg.create(d, {"verdict": {"promote": True, "reasons": []}}, now=T0 + timedelta(minutes=i))
    return reg


def test_vllm_hook_loads_new_versioned_name_then_unloads_the_old(reg, monkeypatch):
    a, b = reg.names()
    monkeypatch.setenv("VLLM_KEY", "sekrit")
    with FakeVllm(api_key="sekrit") as server:
        hook = VllmHook(server.url, name_prefix="lorad", api_key_env="VLLM_KEY", retries=0)
        r1 = publish(reg, reg.promote(a), [hook])
        r2 = publish(reg, reg.promote(b), [hook])
        assert r1.ok and r2.ok
        assert server.loaded == {f"lorad-{b}": str((reg.root / b).resolve())}
        assert [p for p, _ in server.requests] == [
            "/v1/load_lora_adapter",
            "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter",
        ]
        # rollback: the old name comes back (same immutable files), the bad one is unloaded
        r3 = publish(reg, reg.rollback(), [hook])
        assert r3.ok and server.loaded == {f"lorad-{a}": str((reg.root / a).resolve())}


def test_vllm_hook_retries_with_backoff_on_server_errors(reg):
    a = reg.names()[0]
    waits = []
    with FakeVllm(fail_first=2) as server:
        hook = VllmHook(server.url, retries=3, backoff=0.5, sleep=waits.append)
        report = publish(reg, reg.promote(a), [hook])
    assert report.ok and waits == [0.5, 1.0]


def test_vllm_hook_gives_up_after_retries_and_records_the_failure(reg):
    a = reg.names()[0]
    buffer = Buffer(":memory:")
    with FakeVllm(fail_first=10) as server:
        hook = VllmHook(server.url, retries=2, backoff=0, sleep=lambda s: None)
        report = publish(reg, reg.promote(a), [hook], audit=buffer.record_event)
    assert not report.ok and report.reverted is None  # not required: the promotion stands
    assert reg.current() == a
    assert "after 3 attempts" in report.results[0].detail
    (event,) = buffer.events("publish_failed")
    assert event["version"] == a and "503" in event["detail"]["detail"]


def test_failing_required_hook_reverts_the_pointer(reg, tmp_path):
    a, b = reg.names()
    reg.promote(a)
    log = tmp_path / "calls.txt"
    script = tmp_path / "hook.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(log)!r}, 'a').write(os.environ['LORAD_ACTION'] + ' ' + ' '.join(sys.argv[1:]) + '\\n')\n"
        "sys.exit(3 if os.environ['LORAD_ACTION'] == 'promoted' else 0)\n"
    )
    hook = CommandHook((sys.executable, str(script), "{version}", "{previous}"), timeout=20, required=True)
    report = publish(reg, reg.promote(b), [hook])
    assert report.reverted is not None
    assert (reg.current(), reg.previous()) == (a, None)
    assert "exit 3" in report.results[0].detail
    # the hook ran again for the revert so the server follows the pointer back
    assert log.read_text().splitlines() == [f"promoted {b} {a}", f"reverted {a} {b}"]


def test_command_hook_fills_placeholders_and_times_out(reg, tmp_path):
    a = reg.names()[0]
    out = tmp_path / "out.txt"
    ok = CommandHook(
        (
            sys.executable,
            "-c",
            f"import sys; open({str(out)!r}, 'w').write(repr(sys.argv[1:]))",
            "{version}",
            "{path}",
            "{previous}",
        ),
        timeout=20,
    )
    change = reg.promote(a)
    (result,) = publish(reg, change, [ok]).results
    assert result.ok
    assert out.read_text() == repr([a, str((reg.root / a).resolve()), ""])
    slow = CommandHook((sys.executable, "-c", "import time; time.sleep(30)"), timeout=0.5)
    assert "timed out" in slow.run(change, reg.root).detail


def test_hooks_are_built_from_publish_tables():
    hooks = hooks_from_settings(
        [
            PublishSettings(kind="command", argv=("x", "{version}"), required=True),
            PublishSettings(kind="vllm", url="http://h:8000", retries=5),
        ]
    )
    assert isinstance(hooks[0], CommandHook) and hooks[0].required
    assert isinstance(hooks[1], VllmHook) and hooks[1].retries == 5


def test_a_hook_that_raises_is_a_failed_hook_not_a_failed_promotion(reg):
    """Hooks built without the config's checks (an empty argv, a vLLM hook without a URL) raise
    inside; publish reports them failed like any other hook and never lets the exception out."""
    a, b = reg.names()
    buffer = Buffer(":memory:")
    report = publish(reg, reg.promote(a), [CommandHook(()), VllmHook("")], audit=buffer.record_event)
    assert reg.current() == a and report.reverted is None  # not required: the promotion stands
    assert [r.ok for r in report.results] == [False, False]
    assert "IndexError" in report.results[0].detail and "ValueError" in report.results[1].detail
    assert len(buffer.events("publish_failed")) == 2
    required = publish(reg, reg.promote(b), [CommandHook((), required=True)])
    assert required.reverted is not None and reg.current() == a


def test_a_cancel_ends_hooks_waiting_on_a_server_and_is_recorded(reg):
    """A vLLM server dripping its reply and a command that sleeps, each with a long deadline:
    a cancel from another thread ends both waits at once, each a failed hook saying so; the
    required one reverts the change; publish_cancelled is logged and audited."""
    import threading
    import time

    from fake_http import DrippingHandler

    a, b = reg.names()
    reg.promote(a)
    buffer = Buffer(":memory:")
    cancel = threading.Event()
    with FakeServer(DrippingHandler.every(0.2)) as server:
        hooks = [
            VllmHook(server.url, retries=3, timeout=60, required=True),
            CommandHook((sys.executable, "-c", "import time; time.sleep(60)"), timeout=60),
        ]
        threading.Timer(0.5, cancel.set).start()
        started = time.monotonic()
        report = publish(reg, reg.promote(b), hooks, audit=buffer.record_event, cancel=cancel)
        took = time.monotonic() - started
    assert took < 3, took
    assert report.cancelled and [r.ok for r in report.results] == [False, False]
    assert "cancelled after" in report.results[0].detail and report.results[1].detail == "cancelled before it ran"
    assert report.reverted is not None and reg.current() == a
    [event] = buffer.events("publish_cancelled")
    assert event["version"] == b and event["detail"]["hooks"] == [h.name for h in hooks]
    assert report.as_dict()["cancelled"] is True
    # a command already running is stopped by the cancel too
    from lorad.release.registry import Change

    later = threading.Event()
    threading.Timer(0.3, later.set).start()
    started = time.monotonic()
    result = hooks[1].run(Change("promoted", b, a, None, (a, None)), reg.root, later)
    assert not result.ok and result.detail.startswith("cancelled after") and time.monotonic() - started < 2
