"""`lorad ingest` end to end on the real fixture store, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lorad", *args], capture_output=True, text=True)


def write_config(tmp_path, store, extra=""):
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[store.sources]]\nkind = "atomicguard"\npath = "{store}"\n' + extra
    )
    return cfg


def test_ingest_prints_correct_counts_for_the_fixture_store(tmp_path, fixture_store):
    cfg = write_config(tmp_path, fixture_store)
    first = run_cli("--config", str(cfg), "ingest")
    assert first.returncode == 0, first.stderr
    assert "new 102  updated 0  unchanged 0  quarantined 0" in first.stdout
    assert "102 artifacts in 40 chains (10 first-try, 25 refined, 5 exhausted, 0 open)" in first.stdout
    again = run_cli("--config", str(cfg), "ingest", "--json")
    payload = json.loads(again.stdout)
    assert (payload["new"], payload["unchanged"], payload["quarantined"]) == (0, 102, 0)
    assert payload["buffer"]["artifacts"] == 102


def test_ingest_lists_quarantined_inputs_with_reasons(tmp_path, fixture_store):
    bad = fixture_store / "objects" / "zz" / "zz-broken.json"
    bad.parent.mkdir()
    bad.write_text('{"artifact_id": 1}')
    cfg = write_config(tmp_path, fixture_store, "[store]\nsettle_seconds = 0.0\n")
    out = run_cli("--config", str(cfg), "ingest", "--quarantine")
    assert out.returncode == 0
    assert "quarantined 1" in out.stdout
    assert "objects/zz/zz-broken.json: artifact_id: must be a string, got a number" in out.stdout


def test_ingest_without_sources_says_what_to_configure(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n')
    out = run_cli("--config", str(cfg), "ingest")
    assert out.returncode == 78
    assert "no sources configured" in out.stderr


def test_missing_store_directory_is_an_error_not_a_crash(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "does-not-exist")
    out = run_cli("--config", str(cfg), "ingest")
    assert out.returncode == 0  # nothing there yet is not an error: the store may appear later
    assert "new 0" in out.stdout


class _Recording:
    """A reader that records whether the cycle collector runs while it is read."""

    key = "recording"

    def __init__(self, fail: bool = False):
        self.fail, self.collector_on = fail, []

    def scan(self, buffer, batch_size=500, paths=None):
        import gc

        from lorad.buffer.batch import Batch

        self.collector_on.append(gc.isenabled())
        if self.fail:
            raise OSError(5, "Input/output error")
        yield Batch(self.key)

    def watch_paths(self):
        return []


def test_the_cycle_collector_is_paused_during_a_scan_and_back_on_after(buffer):
    import gc

    from lorad.sources.ingest import ingest

    assert gc.isenabled()
    reader, failing = _Recording(), _Recording(fail=True)
    report = ingest(buffer, [reader, failing])
    assert reader.collector_on == [False] and failing.collector_on == [False]
    assert report.errors and gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    try:
        ingest(buffer, [_Recording()])
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_lone_surrogate_or_a_nan_score_is_quarantined_with_a_reason_and_the_rest_ingested(tmp_path):
    """A JSONL line or an artifact file holding a lone surrogate (``"\\ud800"``) stopped the
    whole scan, on every pass (SQLite cannot store it); a NaN score was stored as "rejected"."""
    from lorad.buffer.store import Buffer
    from lorad.demo import synthetic
    from lorad.sources.atomicguard import AtomicGuardSource
    from lorad.sources.ingest import ingest
    from lorad.sources.jsonl import JsonlSource

    good = {"id": "ok", "prompt": "Write f.", "completion": "def f(): pass", "status": "accepted"}
    scored = {k: v for k, v in good.items() if k != "status"}
    log = tmp_path / "feedback.jsonl"
    log.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in (
                good | {"id": "surrogate", "prompt": "Write f.\ud800"},  # json.dumps writes it as the escape \ud800
                scored | {"id": "nan", "score": float("nan")},  # written as the literal NaN
                scored | {"id": "inf", "score": float("inf")},
                good,
            )
        )
    )
    store = tmp_path / "store"
    for name, content in (("aa/bad.json", "def f():\udfff pass"), ("bb/fine.json", "def f(): pass")):
        path = store / "objects" / name
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(synthetic.artifact(workflow_id="w-" + name[:2], content=content, status="accepted")))
    with Buffer(tmp_path / "b.sqlite3") as b:
        report = ingest(b, [JsonlSource("jsonl", log), AtomicGuardSource("ag", store, settle_seconds=0.0)])
        assert report.errors == []
        assert sorted(r["locator"] for r in b.artifacts()) == ["objects/bb/fine.json", "ok"]
        reasons = sorted(q["reason"] for q in b.quarantine())
    assert len(reasons) == 4, reasons
    assert sum("lone surrogate" in r for r in reasons) == 2, reasons
    assert sum("score: must be a finite number" in r for r in reasons) == 2, reasons
