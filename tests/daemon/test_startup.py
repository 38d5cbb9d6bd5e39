"""Start-up errors that restarting cannot fix end in one clear line and exit 78, which the
systemd unit does not restart (issue 13, bug 4)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from daemon_helpers import config_text
from test_unit_file import directives

from lorad.config import EX_CONFIG


def _serve(root, config: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    path = root / "config.toml"
    path.write_text(config)
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LORAD_CONFIG", "RUNTIME_DIRECTORY")}
    return subprocess.run(
        [*(wrap or []), sys.executable, "-m", "lorad", "--config", str(path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=root,
    )


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == EX_CONFIG, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_serve_refuses_a_state_dir_that_is_a_file(short_root, store):
    (short_root / "state").write_text("not a directory\n")
    line = _one_line(_serve(short_root, config_text(short_root, store)))
    assert line == f"lorad: cannot start: daemon.state_dir: {short_root / 'state'} is not a directory"


def test_serve_refuses_a_read_only_state_dir(short_root, store):
    state = short_root / "state"
    state.mkdir()
    wrap = None
    if os.geteuid() == 0:  # root writes through mode bits: make it a read-only mount, in a private namespace
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
            pytest.skip("as root this needs unshare -m for a private read-only mount")
        wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o ro tmpfs "{state}" && exec "$0" "$@"']
    else:
        state.chmod(0o555)
    try:
        line = _one_line(_serve(short_root, config_text(short_root, store), wrap))
    finally:
        state.chmod(0o755)
    assert line.startswith(f"lorad: cannot start: daemon.state_dir: {state} is not writable (")


def test_serve_refuses_a_socket_path_too_long_before_the_startup_scan(short_root, store):
    long_dir = short_root / ("d" * 100)
    config = config_text(short_root, store).replace(
        f'socket = "{short_root / "lorad.sock"}"', f'socket = "{long_dir / "lorad.sock"}"'
    )
    line = _one_line(_serve(short_root, config))
    assert line.startswith(f"lorad: cannot start: daemon.socket: {long_dir / 'lorad.sock'} is ")
    assert "at most 107 bytes" in line
    assert not (short_root / "state" / "buffer.sqlite3").exists()  # refused before the buffer and the scan


def test_client_with_a_socket_path_too_long_says_so_and_exits_78(short_root):
    long_sock = short_root / ("d" * 100) / "lorad.sock"
    config = short_root / "config.toml"
    config.write_text(f'[daemon]\nsocket = "{long_sock}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "lorad", "--config", str(config), "status"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EX_CONFIG and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"lorad: config error: daemon.socket: {long_sock} is ")


def test_the_unit_does_not_restart_on_the_startup_error_code():
    prevented = " ".join(directives()["RestartPreventExitStatus"]).split()
    assert str(EX_CONFIG) in prevented
