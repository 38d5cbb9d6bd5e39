"""systemd/lorad.service: the directives the daemon relies on, and systemd-analyze's verdicts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent.parent / "systemd" / "lorad.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_declares_notify_watchdog_restart_policy_and_directories():
    d = directives()
    expected = {
        "Type": "notify",
        "User": "lorad",
        "StateDirectory": "lorad",
        "RuntimeDirectory": "lorad",
        "ConfigurationDirectory": "lorad",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "78",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "KillMode": "mixed",
        "IOSchedulingClass": "idle",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], key
    assert "WatchdogSec" in d and int(d["WatchdogSec"][0]) > 0
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ExecStart"][0].endswith("lorad --config /etc/lorad/config.toml serve")
    assert any("nvidia" in v for v in d["DeviceAllow"])


def _unit_for_this_host(tmp_path) -> Path:
    """The unit with ExecStart pointing at this venv's lorad (verify checks that it exists)."""
    lorad = Path(sys.executable).parent / "lorad"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={lorad}", UNIT.read_text(), flags=re.M)
    path = tmp_path / "lorad.service"
    path.write_text(text)
    return path


def test_unit_passes_systemd_analyze_verify_and_security_when_installed(tmp_path):
    """Runs only where systemd-analyze exists (installs nothing); elsewhere it is skipped, saying so."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this host")
    unit = _unit_for_this_host(tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout + security.stderr)
    assert m, security.stdout[-2000:] + security.stderr
    assert float(m.group(1)) <= 2.5, security.stdout
