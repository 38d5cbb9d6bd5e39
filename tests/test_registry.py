"""Adapter versions: immutable, checksummed, atomically swapped pointers, rollback, pruning."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from lorad.buffer.store import Buffer
from lorad.release.registry import Registry, RegistryError, TamperedVersion, UnknownVersion

T0 = datetime(2026, 11, 21, 3, 0, 0, tzinfo=timezone.utc)


def adapter(tmp_path, tag: str):
    d = tmp_path / f"adapter-{tag}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "tag": tag}))
    (d / "adapter_model.safetensors").write_bytes(os.urandom(64))
    return d


def make(reg, tmp_path, i, promote=True, nll=None):
    record = {
        "base_model": "tiny",
        "method": "sft",
        "metrics": {"candidate": {"nll": nll or 3.0 - i * 0.1}},
        "verdict": {"promote": promote, "reasons": ["test"]},
    }
    return reg.create(adapter(tmp_path, str(i)), record, now=T0 + timedelta(minutes=i)).name


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "adapters", keep=2, keep_best=True)


def test_version_is_named_by_number_and_utc_time_and_records_every_file_sha256(reg, tmp_path):
    v = reg.get(make(reg, tmp_path, 1))
    assert v.name == "v0001-20261121T030100Z"
    assert set(v.record["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert v.record["base_model"] == "tiny" and v.record["version"] == v.name
    assert reg.verify(v.name) == []
    assert (v.path / "adapter_model.safetensors").stat().st_mode & 0o222 == 0  # read-only


def test_names_are_never_reused_even_after_pruning(reg, tmp_path):
    names = [make(reg, tmp_path, i) for i in range(1, 4)]
    # Even when the newest version is gone (deleted by hand), its number is not handed out again.
    shutil.rmtree(reg.root / names[-1])
    assert make(reg, tmp_path, 9).startswith("v0004-")


def test_promote_moves_current_and_previous_atomically_as_relative_symlinks(reg, tmp_path):
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    assert reg.current() == a and reg.previous() is None
    change = reg.promote(b, reason="better")
    assert (reg.current(), reg.previous()) == (b, a)
    assert change.replaced == a and change.before == (a, None)
    assert os.readlink(reg.root / "current") == b  # relative: the state dir can move
    assert not [p for p in reg.root.iterdir() if p.name.endswith(".tmp")]


def test_promotion_refuses_a_tampered_version_and_pointers_stay(reg, tmp_path):
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    weights = reg.root / b / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"evil")
    with pytest.raises(TamperedVersion, match="adapter_model.safetensors: sha256 does not match"):
        reg.promote(b)
    assert reg.current() == a


def test_a_file_slipped_into_a_version_counts_as_tampering(reg, tmp_path):
    a = make(reg, tmp_path, 1)
    (reg.root / a / "extra.bin").write_bytes(b"x")
    with pytest.raises(TamperedVersion, match="extra.bin: not listed"):
        reg.promote(a)


def test_rollback_defaults_to_previous_and_walks_back_through_blessed_history(reg, tmp_path):
    a, b, c = (make(reg, tmp_path, i) for i in (1, 2, 3))
    for v in (a, b, c):
        reg.promote(v)
    change = reg.rollback(reason="regressed")
    assert (reg.current(), reg.previous()) == (b, a)
    assert change.replaced == c
    reg.rollback()
    assert (reg.current(), reg.previous()) == (a, None)
    with pytest.raises(RegistryError, match="no previous version"):
        reg.rollback()


def test_rollback_to_a_named_version_and_by_number(reg, tmp_path):
    a, b, c = (make(reg, tmp_path, i) for i in (1, 2, 3))
    for v in (a, b, c):
        reg.promote(v)
    reg.rollback("1")
    assert reg.current() == a
    with pytest.raises(UnknownVersion):
        reg.rollback("v0042")


def test_rollback_refuses_a_tampered_target(reg, tmp_path):
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    reg.promote(b)
    (reg.root / a / "adapter_config.json").unlink()
    with pytest.raises(TamperedVersion, match="missing"):
        reg.rollback()
    assert reg.current() == b


def test_revert_puts_both_pointers_back(reg, tmp_path):
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    change = reg.promote(b)
    reg.revert(change, reason="required hook failed")
    assert (reg.current(), reg.previous()) == (a, None)
    assert [e["action"] for e in reg.pointer_log()] == ["promoted", "promoted", "reverted"]


def test_promotion_and_rollback_are_audit_events_in_the_buffer(tmp_path):
    buffer = Buffer(":memory:")
    reg = Registry(tmp_path / "adapters", audit=buffer.record_event)
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a, reason="first")
    reg.promote(b, reason="better", metrics={"nll": 1.0})
    reg.rollback(reason="live acceptance fell")
    events = buffer.events()
    assert [e["event"] for e in events] == ["adapter_rolled_back", "adapter_promoted", "adapter_promoted"]
    assert events[0]["version"] == a and events[0]["detail"]["replaced"] == b
    assert events[0]["detail"]["reason"] == "live acceptance fell"
    assert events[1]["detail"]["metrics"] == {"nll": 1.0}


def test_pruning_keeps_current_previous_newest_keep_and_best(tmp_path):
    reg = Registry(tmp_path / "adapters", keep=2, keep_best=True)
    # v1 best (lowest nll) but old; v3 current..., v2 previous
    names = [make(reg, tmp_path, 1, nll=0.5)]
    names += [make(reg, tmp_path, i, nll=2.0) for i in range(2, 8)]
    names.append(make(reg, tmp_path, 8, promote=False, nll=0.1))  # rejected: never "best"
    reg.promote(names[1])
    reg.promote(names[2])
    removed = reg.prune()
    kept = set(reg.names())
    assert kept == {names[0], names[1], names[2], names[6], names[7]}
    assert set(removed) == set(names) - kept
    assert reg.current() == names[2] and reg.verify(names[2]) == []


def test_pruning_without_keep_best_drops_the_old_best(tmp_path):
    reg = Registry(tmp_path / "adapters", keep=1, keep_best=False)
    names = [make(reg, tmp_path, 1, nll=0.5)] + [make(reg, tmp_path, i) for i in (2, 3)]
    reg.promote(names[1])
    reg.prune()
    assert reg.names() == names[1:]


def test_crash_leftover_temporary_version_is_invisible_and_pruned(reg, tmp_path):
    (reg.root / ".tmp-v0009-20261121T000000Z").mkdir(parents=True)
    a = make(reg, tmp_path, 1)
    assert reg.names() == [a]
    reg.prune()
    assert not list(reg.root.glob(".tmp-*"))


# -- pointers and records that were bent outside lorad (issue 13, bug 7) ---------------------------


def _edit(path, text: str) -> None:
    path.chmod(0o640)
    path.write_text(text)


def test_an_edited_lorad_json_fails_verification_and_is_not_promoted(reg, tmp_path):
    """lorad.json is covered by the digest the pointer log kept when the version was made."""
    a = make(reg, tmp_path, 1, promote=False)
    record = reg.root / a / "lorad.json"
    _edit(record, record.read_text().replace('"promote": false', '"promote": true'))
    assert reg.verify(a) == ["lorad.json: sha256 does not match the digest recorded when the version was made"]
    with pytest.raises(TamperedVersion, match="lorad.json"):
        reg.promote(a)
    assert reg.current() is None


def test_current_pointing_outside_the_registry_is_refused_and_shown(reg, tmp_path):
    from structlog.testing import capture_logs

    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    reg.promote(b)
    outside = tmp_path / "elsewhere"
    shutil.copytree(reg.root / a, outside / a)
    (reg.root / "current").unlink()
    (reg.root / "current").symlink_to(outside / a)
    with capture_logs() as logs:
        assert reg.current() is None and reg.current() is None
    assert reg.previous() == a
    (problem,) = reg.pointer_problems()
    assert problem.startswith(f"current points at {outside / a}, outside the registry")
    assert [e["event"] for e in logs] == ["registry_pointer_refused"]  # once, not at every read


def test_current_repointed_by_hand_to_another_version_is_refused(reg, tmp_path):
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    reg.promote(b)
    os.symlink(a, reg.root / "tmp-link")
    os.replace(reg.root / "tmp-link", reg.root / "current")
    assert reg.current() is None
    assert reg.pointer_problems() == [
        f"current points at {a}, but the pointer log says {b}: changed outside lorad "
        "(or lorad was killed while moving it)"
    ]


def test_current_whose_files_fail_their_sha256_is_reported_and_can_be_rolled_back_from(reg, tmp_path):
    """Still named (so prepare refuses to build on it), reported, and rolling back away from it works."""
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    reg.promote(b)
    _edit(reg.root / b / "adapter_model.safetensors", "poisoned")
    assert reg.current() == b
    assert reg.pointer_problems() == [
        f"current points at {b}, which fails verification: adapter_model.safetensors: sha256 does not match lorad.json"
    ]
    assert reg.rollback().version == a and reg.pointer_problems() == []


def test_deleted_current_is_noticed_and_rollback_refuses_instead_of_publishing_previous_empty(reg, tmp_path):
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2)
    reg.promote(a)
    reg.promote(b)
    (reg.root / "current").unlink()
    assert reg.current() is None
    assert reg.pointer_problems() == [f"current is missing; the pointer log says {b}"]
    with pytest.raises(RegistryError, match=f"current is missing; the pointer log says {b}.*lorad promote"):
        reg.rollback()
    # promoting by name repairs it, and tells the hooks what the server was last given
    change = reg.promote(a, reason="repair")
    assert (reg.current(), reg.previous()) == (a, b) and change.replaced == b
    assert reg.pointer_problems() == []


def test_history_and_status_agree_on_a_bent_current(tmp_path):
    from lorad.config import loads
    from lorad.daemon.service import Service
    from lorad.release.history import history as history_view

    settings = loads(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    reg = Registry(settings.state_dir / "adapters")
    a = make(reg, tmp_path, 1)
    reg.promote(a)
    (reg.root / "current").unlink()
    (reg.root / "current").symlink_to(tmp_path / "nowhere" / a)
    history = history_view(settings)
    status_registry = Service(settings).registry  # what lorad status reads
    assert history["current"] is None and status_registry.current() is None
    assert history["problems"] == status_registry.pointer_problems() != []


def test_lorad_history_warns_of_a_bent_pointer_and_an_edited_record(tmp_path, capsys):
    from lorad.cli import main

    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    reg = Registry(tmp_path / "state" / "adapters")
    a, b = make(reg, tmp_path, 1), make(reg, tmp_path, 2, promote=False)
    reg.promote(a)
    (reg.root / "current").unlink()
    record = reg.root / b / "lorad.json"
    _edit(record, record.read_text().replace('"promote": false', '"promote": true'))
    assert main(["--config", str(config), "history"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING current is missing; the pointer log says {a}" in out
    assert "lorad.json EDITED since it was made" in out


@pytest.mark.parametrize("name", ["²", "v²", "٣", "v" + "9" * 5000])
def test_a_version_named_with_non_ascii_digits_is_no_such_version(tmp_path, name):
    """'²'.isdigit() is true but int('²') raises ValueError: export-adapter, promote, rollback
    and history gave a traceback, and the daemon "internal error"."""
    reg = Registry(tmp_path / "adapters")
    weights = tmp_path / "adapter"
    weights.mkdir()
    (weights / "adapter_model.safetensors").write_bytes(b"w")
    reg.create(weights, {"verdict": {"promote": True, "reasons": []}})
    with pytest.raises(UnknownVersion, match="no adapter version"):
        reg.get(name)
    with pytest.raises(UnknownVersion):
        reg.promote(name)
    with pytest.raises(UnknownVersion):
        reg.rollback(name)


@pytest.mark.parametrize(
    "command", [["export-adapter", "²", "--output", "x.gguf"], ["promote", "²"], ["rollback", "²"], ["history", "²"]]
)
def test_the_commands_say_no_such_version_for_a_non_ascii_digit(tmp_path, capsys, command):
    from lorad.cli import main

    reg = Registry(tmp_path / "state" / "adapters")
    weights = tmp_path / "adapter"
    weights.mkdir()
    (weights / "adapter_model.safetensors").write_bytes(b"w")
    reg.promote(reg.create(weights, {"verdict": {"promote": True, "reasons": []}}).name)
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nsocket = "{tmp_path / "s.sock"}"\n')
    capsys.readouterr()
    assert main(["--config", str(config), *command]) == 1
    err = capsys.readouterr().err
    assert "no adapter version '²'" in err and "Traceback" not in err
