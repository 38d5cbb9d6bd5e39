"""Fixtures for the crash and fault suite: a private store, `lorad serve` subprocesses that are
always killed at the end, and a leak check on threads and child processes."""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "daemon"))  # daemon_helpers: Daemon, config_text

from daemon_helpers import Daemon, config_text  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(autouse=True)
def _no_leaked_processes():
    """Fail a fault test that leaves child processes or threads behind (after killing them)."""
    threads_before = set(threading.enumerate())
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = [p for p in me.children(recursive=True)
                    if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not threads and not children or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in children:
        p.kill()
    assert not threads, f"fault test leaked threads: {[t.name for t in threads]}"
    assert not children, f"fault test leaked child processes: {[p.pid for p in children]}"


@pytest.fixture
def short_root():
    """A short, world-traversable directory (AF_UNIX socket paths are limited to 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="lorad-f-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(short_root) -> Path:
    dest = short_root / "store"
    shutil.copytree(FIXTURES / "atomicguard-store", dest)
    return dest


@pytest.fixture
def daemon_factory(short_root, store):
    """make(config=None, env=None, start=True, **sections) -> Daemon; every one is stopped (or
    killed) when the test ends."""
    made: list[Daemon] = []

    def make(config: str | None = None, env: dict | None = None, start: bool = True, **sections) -> Daemon:
        d = Daemon(short_root, config or config_text(short_root, store, **sections), env)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        if d.proc is not None:
            try:
                d.stop(timeout=30)
            except AssertionError:
                pass  # stop() killed it; the test's own assertions say what went wrong


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer (hidden 32, 2 layers), built once for the fault suite."""
    import torch

    from lorad.training.tiny import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")
