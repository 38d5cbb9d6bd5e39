"""Live rollback: per-version first-attempt acceptance from the store, two-proportion test."""

from __future__ import annotations

import itertools
import json
import math
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorad import config, release
from lorad.buffer.store import Buffer
from lorad.evaluation.live import Rate, decide_live, live_counts, two_proportion_test
from lorad.sources import open_sources
from lorad.sources.ingest import ingest

T0 = datetime(2026, 11, 21, 3, 0, tzinfo=timezone.utc)


def test_two_proportion_test_matches_a_hand_computed_value():
    # 15/40 vs 30/40: pooled 0.5625, se = sqrt(.5625*.4375*(2/40)) = 0.11094, z = -0.375/0.11094
    z, p = two_proportion_test(Rate(15, 40), Rate(30, 40))
    assert z == pytest.approx(-3.3806, abs=1e-3)
    assert p == pytest.approx(0.000362, abs=2e-5)


def test_no_variance_cannot_reject():
    assert two_proportion_test(Rate(0, 50), Rate(0, 50)) == (0.0, 1.0)
    assert two_proportion_test(Rate(50, 50), Rate(50, 50)) == (0.0, 1.0)


@given(a=st.integers(0, 60), b=st.integers(0, 60))
def test_higher_active_rate_never_rolls_back(a, b):
    active, previous = Rate(max(a, b), 60), Rate(min(a, b), 60)
    assert not decide_live(active, previous, 0.95, 30).roll_back


def test_waits_for_the_minimum_number_of_attempts():
    v = decide_live(Rate(0, 29), Rate(29, 29), 0.95, 30)
    assert not v.roll_back and "not enough live first attempts" in v.reasons[0]


def test_rolls_back_only_when_significantly_worse():
    assert decide_live(Rate(15, 40), Rate(30, 40), 0.95, 30).roll_back
    v = decide_live(Rate(26, 40), Rate(30, 40), 0.95, 30)  # z = -1.0: chance
    assert not v.roll_back and "not significantly worse" in v.reasons[0]


# -- on a synthetic AtomicGuard store whose artifacts name the adapter that produced them ----------


_ARTIFACTS = itertools.count(1)  # unique ids across the module's tests


def write_artifact(store, *, tag, accepted, attempt=1, key="adapter_version", source=None):
    n = next(_ARTIFACTS)
    aid = str(uuid.UUID(int=n))
    doc = {
        "artifact_id": aid,
        "workflow_id": str(uuid.UUID(int=10**6 + n)),
        "content": "def f():\n    return 1\n",
        "previous_attempt_id": None if attempt == 1 else str(uuid.uuid4()),
        "parent_action_pair_id": None,
        "action_pair_id": "g_coder",
        "created_at": (T0 + timedelta(seconds=n)).isoformat(),
        "attempt_number": attempt,
        "status": "accepted" if accepted else "rejected",
        "guard_result": {
            "passed": accepted,
            "feedback": "" if accepted else "failed",
            "fatal": False,
            "sub_results": [],
        },
        "context": {"specification": "Write f.", "constraints": "", "feedback_history": [], "dependency_artifacts": {}},
        "metadata": {key: tag} if tag else {},
    }
    if source:
        doc["source"] = source
    d = store / "objects" / aid[:2]
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{aid}.json").write_text(json.dumps(doc))


@pytest.fixture
def world(tmp_path):
    store = tmp_path / "store"
    (store / "objects").mkdir(parents=True)
    s = config.loads(f"""
[daemon]
state_dir = "{tmp_path / "state"}"
[[store.sources]]
kind = "atomicguard"
path = "{store}"
[evaluation]
live_min_attempts = 30
live_confidence = 0.95
""")
    reg = release.open_registry(s)
    names = []
    for i in (1, 2):
        a = tmp_path / f"a{i}"
        a.mkdir()
        (a / "adapter_model.safetensors").write_bytes(bytes([i]) * 8)
        names.append(reg.create(a, {"verdict": {"promote": True, "reasons": []}}, now=T0 + timedelta(hours=i)).name)
    reg.promote(names[0])
    reg.promote(names[1])
    return s, store, names


def fill(store, tag, accepted, total, prefix=""):
    for i in range(total):
        write_artifact(store, tag=prefix + tag, accepted=i < accepted)


def test_counts_first_attempts_per_version_from_the_store(world):
    s, store, (v1, v2) = world
    fill(store, v1, 30, 40)
    fill(store, v2, 15, 40, prefix="lorad-")  # the vLLM name counts for its version
    write_artifact(store, tag=v2, accepted=True, attempt=2)  # a retry is not a first attempt
    write_artifact(store, tag=None, accepted=False)  # produced by nobody we know
    write_artifact(store, tag=v2, accepted=True, attempt=3, source="human")  # a person's answer
    with Buffer(s.buffer_path) as buffer:
        ingest(buffer, open_sources(s.store), 500)
        counts = live_counts(buffer.conn, "adapter_version", [v1, v2])
    assert counts == {v1: Rate(30, 40, 40), v2: Rate(15, 40, 41)}
    assert counts[v2].mean_attempts == 41 / 40 and counts[v2].as_dict()["first_try"] == 15 / 40


def test_live_rollback_when_active_version_is_significantly_worse(world):
    s, store, (v1, v2) = world
    fill(store, v1, 30, 40)
    fill(store, v2, 15, 40)
    with Buffer(s.buffer_path) as buffer:
        ingest(buffer, open_sources(s.store), 500)
        reg = release.open_registry(s, buffer)
        out = release.check_live(s, buffer)
        events = buffer.events("adapter_rolled_back")
    assert out["rolled_back"] and out["to"] == v1
    assert reg.current() == v1
    assert "significantly worse" in out["reasons"][0] and "15/40" in out["reasons"][0]
    assert events[0]["detail"]["reason"].startswith("live: ")


def test_no_live_rollback_when_the_difference_is_chance(world):
    s, store, (v1, v2) = world
    fill(store, v1, 30, 40)
    fill(store, v2, 26, 40)
    with Buffer(s.buffer_path) as buffer:
        ingest(buffer, open_sources(s.store), 500)
        reg = release.open_registry(s, buffer)
        out = release.check_live(s, buffer)
    assert not out["rolled_back"] and reg.current() == v2
    assert math.isclose(out["counts"][v2]["attempts"], 40)


def test_history_and_report_show_each_versions_live_first_try_rate_and_attempts(world, tmp_path, capsys):
    from lorad.cli import main

    s, store, (v1, v2) = world
    fill(store, v1, 30, 40)
    for _ in range(20):  # v2's first attempts all failed; each task took a second attempt
        write_artifact(store, tag=v2, accepted=False)
        write_artifact(store, tag=v2, accepted=True, attempt=2)
    with Buffer(s.buffer_path) as buffer:
        ingest(buffer, open_sources(s.store), 500)
    config_path = tmp_path / "config.toml"
    config_path.write_text(f'[daemon]\nstate_dir = "{s.state_dir}"\n')
    assert main(["--config", str(config_path), "history"]) == 0
    listing = capsys.readouterr().out
    assert "LIVE 1ST" in listing
    assert any(v1 in line and "75% (30/40)" in line and "1.00" in line for line in listing.splitlines())
    assert any(v2 in line and "0% (0/20)" in line and "2.00" in line for line in listing.splitlines())
    assert main(["--config", str(config_path), "history", v2, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["live"] == {
        "accepted": 0,
        "attempts": 20,
        "generated": 40,
        "first_try": 0.0,
        "mean_attempts": 2.0,
    }
    report = tmp_path / "report.html"
    assert main(["--config", str(config_path), "report", "--output", str(report)]) == 0
    page = report.read_text()
    assert "mean attempts per task while the version served" in page and "75% (30/40), 1.00" in page
