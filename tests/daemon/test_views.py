"""What the daemon counts for status and for its trigger."""

from __future__ import annotations

from lorad.buffer import examples
from lorad.buffer.store import Buffer
from lorad.config import SelectionSettings
from lorad.daemon import views
from lorad.release.registry import Registry
from lorad.sources import AtomicGuardSource
from lorad.sources.ingest import ingest


def _version(reg: Registry, tmp_path, max_seq: int, promote: bool) -> str:
    adapter = tmp_path / f"adapter-{max_seq}-{promote}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    v = reg.create(adapter, {"examples": {"max_seq": max_seq}, "verdict": {"promote": promote, "reasons": []}})
    if promote:
        reg.promote(v.name)
    return v.name


def test_a_rejected_candidate_is_not_retrained_on_the_same_examples(tmp_path, fixture_store):
    state = tmp_path / "state"
    with Buffer(state / "buffer.sqlite3") as buffer:
        ingest(buffer, [AtomicGuardSource("ag", fixture_store)])
        examples.refresh(buffer, SelectionSettings())
        total = examples.count_new(buffer, 0)
        assert total > 0
        reg = Registry(state / "adapters")
        counts = views.buffer_counts(buffer, reg)
        assert counts["new_examples"] == counts["untrained_examples"] == total

        top = buffer.conn.execute("SELECT max(seq) FROM examples").fetchone()[0]
        _version(reg, tmp_path, top, promote=False)  # trained on everything, rejected
        counts = views.buffer_counts(buffer, reg)
        assert counts["new_examples"] == total  # nothing promoted since: all still new
        assert counts["untrained_examples"] == 0  # but nothing to train on that was not tried
