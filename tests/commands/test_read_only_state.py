"""`lorad ingest` and `lorad train` on a state directory they cannot write: one line naming the
key and exit 78, as `lorad serve` does, never a traceback (issue 23)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lorad.config import EX_CONFIG

FIXTURES = Path(__file__).parent.parent / "fixtures"


def _read_only(state: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` with ``state`` read-only: a read-only bind mount in a private namespace as
    root (who writes through mode bits), mode 0555 otherwise."""
    wrap = []
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], check=False).returncode != 0:
            pytest.skip("as root this needs unshare -m for a private read-only mount")
        wrap = [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount --bind "{state}" "{state}" && mount -o remount,bind,ro "{state}" && exec "$0" "$@"',
        ]
    else:
        state.chmod(0o555)
    try:
        return subprocess.run([*wrap, *argv], check=False, capture_output=True, text=True, timeout=120)
    finally:
        state.chmod(0o755)


@pytest.mark.parametrize("command", ["ingest", "train"])
@pytest.mark.parametrize("buffer", ["none yet", "made before"])
def test_a_read_only_state_dir_is_one_line_naming_the_key_and_exit_78(tmp_path, command, buffer):
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{state}"\n[[store.sources]]\nkind = "atomicguard"\n'
        f'path = "{FIXTURES / "atomicguard-store"}"\n[training]\nbase_model = "never-loaded"\n'
    )
    state.mkdir()
    lorad = [sys.executable, "-m", "lorad", "--config", str(config)]
    if buffer == "made before":
        assert subprocess.run([*lorad, "ingest"], check=False, capture_output=True, timeout=120).returncode == 0
    done = _read_only(state, [*lorad, command, *(["--no-progress"] if command == "train" else [])])
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"lorad: cannot {command}: daemon.state_dir: {state} is not writable ("), line
