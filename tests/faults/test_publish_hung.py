"""A publish target that hangs: a vLLM server that takes the request and drips its answer a byte
at a time (issue 23, finding 2). Promote requests whose clients gave up hold no control worker,
the other commands stay answered, `lorad cancel` reaches a conclusion waiting on the hook,
and SIGTERM waits no longer than one request's deadline (the next start finishes the
conclusion)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from daemon_helpers import WORKER_ENV, config_text, training_sections

from fake_http import DrippingHandler, FakeServer  # (tests/, on the path through tests/conftest.py)
from lorad.buffer.store import Buffer
from lorad.daemon import protocol
from lorad.release.registry import Registry

pytestmark = [pytest.mark.faults, pytest.mark.timeout(400)]

DRIP = 0.5  # seconds between two bytes of the hung server's answer


class Hung(FakeServer):
    """Answers every request a byte every DRIP seconds, for ever; records what it was asked."""

    def __init__(self):
        self.seen: list[str] = []
        fake = self

        class Handler(DrippingHandler.every(DRIP)):
            def _drip(self):
                fake.seen.append(f"{self.command} {self.path}")
                super()._drip()

            do_GET = do_POST = _drip

        super().__init__(Handler)


def hung_hook(url: str, timeout: float, retries: int) -> str:
    return f'[[publish]]\nkind = "vllm"\nurl = "{url}"\ntimeout = {timeout}\nretries = {retries}\nbackoff = 0.0\n'


def two_versions(state: Path) -> tuple[str, str]:
    """Two small versions (not loadable adapters: the hook never gets that far), the first current."""
    registry = Registry(state / "adapters")
    names = []
    for i in (1, 2):
        d = state.parent / f"adapter-{i}"
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(bytes([i]) * 16)
        names.append(registry.create(d, {"verdict": {"promote": True, "reasons": []}}).name)
    registry.promote(names[0], reason="serving before the test")
    return names[0], names[1]


def answered_quickly(d, command: str, **args) -> dict:
    started = time.monotonic()
    answer = d.request(command, timeout=5, **args)
    took = time.monotonic() - started
    assert took < 2, f"{command} took {took:.1f} s"
    return answer


def test_promotes_whose_clients_gave_up_never_starve_the_other_commands(daemon_factory, short_root, store):
    """18 `promote` requests whose clients give up after 0.5 s (16 general workers) while the
    hook hangs: every other command is still answered at once, and SIGTERM waits at most one
    request's deadline, not the hook's attempts."""
    state = short_root / "state"
    serving, candidate = two_versions(state)
    with Hung() as server:
        d = daemon_factory(config=config_text(short_root, store) + hung_hook(server.url, timeout=6, retries=3))

        def impatient():
            try:
                d.request("promote", version=candidate, timeout=0.5)
            except protocol.DaemonTimeout:
                pass

        clients = [threading.Thread(target=impatient, name=f"promote-{i}") for i in range(18)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(10)
        d.wait_for(lambda: server.seen, what="the hook's request at the hung server")

        refused = answered_quickly(d, "promote", version=candidate)
        assert not refused["ok"] and "another promote or rollback is still running" in refused["error"]
        assert answered_quickly(d, "jobs")["ok"]
        assert answered_quickly(d, "history")["ok"]
        assert answered_quickly(
            d,
            "feedback",
            record={
                "id": "fb1",
                "prompt": "Write add(a, b).",
                "completion": "def add(a, b): return a + b",
                "status": "accepted",
            },
        )["ok"]
        assert answered_quickly(d, "pause")["scheduling_paused"] is True
        assert answered_quickly(d, "resume")["scheduling_paused"] is False
        assert answered_quickly(d, "train_now")["ok"]
        d.wait_for(
            lambda: any(e.get("event") == "control_client_left" for e in d.events()),
            what="the promote's worker let go of its client",
        )

        started = time.monotonic()
        assert d.stop(timeout=60) == 0
        took = time.monotonic() - started
    assert took < 6 + 4, f"SIGTERM took {took:.1f} s (one request's deadline is 6 s; the hook's 4 attempts 24 s)"
    assert any(e.get("event") == "publish_interrupted" for e in d.events())
    assert Registry(state / "adapters").current() == candidate  # the change stands; only its hook was cut


def test_cancel_reaches_a_conclusion_waiting_on_a_hook_and_sigterm_leaves_it_to_the_restart(
    daemon_factory, short_root, store, tiny_model
):
    """A trained job whose conclusion hangs in the vLLM hook: SIGTERM stops the daemon within one
    request's deadline, the restart concludes it again (the hook hangs again), and `lorad cancel`
    ends that wait at once, recorded; the trained version is kept."""
    with Hung() as server:
        sections = training_sections(tiny_model, min_new_examples=1)
        d = daemon_factory(env=WORKER_ENV, start=False, **sections)
        d.config.write_text(d.config.read_text() + hung_hook(server.url, timeout=5, retries=3))
        d.start()
        job = d.wait_for(
            lambda: server.seen and d.request("status")["job"],
            timeout=240,
            what="the job's conclusion waiting on the hung hook",
        )
        job_id = job["job_id"]
        assert job["state"] == "evaluating"

        started = time.monotonic()
        assert d.stop(timeout=60) == 0
        took = time.monotonic() - started
        assert took < 5 + 4, f"SIGTERM took {took:.1f} s (one request's deadline is 5 s)"
        assert any(e.get("event") == "publish_interrupted" and e.get("job_id") == job_id for e in d.events())

        server.seen.clear()
        d.start()  # the job is concluded again at once, and its hook hangs again
        d.wait_for(lambda: server.seen, timeout=30, what="the hook run again after the restart")
        assert answered_quickly(d, "status")["job"]["job_id"] == job_id
        assert answered_quickly(d, "jobs")["ok"]

        started = time.monotonic()
        assert answered_quickly(d, "cancel", job_id=job_id)["state"] == "cancelling"
        done = d.wait_for(
            lambda: (j := d.request("job", job_id=job_id)["job"])["state"] in ("promoted", "rejected") and j,
            timeout=10,
            what="the conclusion ended by the cancel",
        )
        took = time.monotonic() - started
    assert took < 3, f"the cancel took {took:.1f} s to end the conclusion"
    assert done["version"] and "publish hooks were cancelled by request" in done["reason"]
    with Buffer(short_root / "state" / "buffer.sqlite3", readonly=True) as buffer:
        [event] = buffer.events("publish_cancelled")
    assert event["version"] == done["version"]
    journal = json.loads((short_root / "state" / "jobs" / job_id / "conclusion.json").read_text())
    assert journal["promotion_published"]["cancelled"] is True  # a later start does not wait again
    d.stop()
    d.start()
    assert d.request("job", job_id=job_id)["job"]["state"] == done["state"]
