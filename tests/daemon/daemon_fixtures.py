"""Fixtures shared by the daemon tests and the fault suite: a real `lorad serve` subprocess on
a short temporary directory, a tiny model, and a leak check on threads and child processes.

Each suite's conftest.py imports them, which is how pytest finds fixtures outside a conftest.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from daemon_helpers import Daemon, config_text

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves threads or child processes behind (after killing them)."""
    threads_before = set(threading.enumerate())
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    yield
    deadline = time.monotonic() + 5
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = [
            p
            for p in me.children(recursive=True)
            if p.pid not in children_before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        if not threads and not children or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for p in children:  # clean up, then fail
        p.kill()
    assert not threads, f"test leaked threads: {[t.name for t in threads]}"
    assert not children, f"test leaked child processes: {[p.pid for p in children]}"


@pytest.fixture
def short_root():
    """A short directory for sockets (AF_UNIX paths are limited to 108 bytes), world-traversable."""
    root = Path(tempfile.mkdtemp(prefix="lorad-", dir="/tmp"))
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
    """make(config=None, env=None, start=True, **sections) -> Daemon; every one is stopped when
    the test ends (a daemon that does not stop on SIGTERM fails the test)."""
    started: list[Daemon] = []

    def make(config: str | None = None, env: dict | None = None, start: bool = True, **sections) -> Daemon:
        d = Daemon(short_root, config or config_text(short_root, store, **sections), env)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        if d.proc is not None:
            d.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama + tokenizer (hidden 32, 2 layers), built once per session."""
    import torch

    from lorad.training.tiny import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")
