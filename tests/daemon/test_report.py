"""`lorad report`: a self-contained HTML page with the loss curves and the metrics across versions."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Buffer
from lorad.cli import main
from lorad.release.registry import Registry


def make_state(root):
    state = root / "state"
    with Buffer(state / "buffer.sqlite3") as buffer:
        store = JobStore(buffer.conn)
        for n, losses in enumerate(([3.0, 2.5, 2.1, 1.9], [2.0, 1.7, 1.6])):
            job = store.create("manual")
            job_dir = state / "jobs" / job["job_id"]
            job_dir.mkdir(parents=True)
            with open(job_dir / "progress.jsonl", "w") as f:
                f.write(json.dumps({"stage": "preparing", "step": 0}) + "\n")
                for step, loss in enumerate(losses, 1):
                    f.write(
                        json.dumps({"stage": "training", "step": step, "total_steps": len(losses), "loss": loss}) + "\n"
                    )
                f.write('{"stage": "training", "step": 99, "loss": NaN}\n')  # never plotted
            store.transition(job["job_id"], "promoted", "better", job_dir=str(job_dir), version=f"v{n + 1:04d}")
    reg = Registry(state / "adapters")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    for nll, ref, eps in ((2.2, 2.5, 0.4), (1.8, 2.2, 0.5)):
        v = reg.create(
            adapter,
            {
                "metrics": {"candidate": {"nll": nll, "epsilon": eps}, "active": {"nll": ref, "epsilon": 0.4}},
                "compared_with": {"label": "active"},
                "verdict": {"promote": True, "reasons": ["held-out loss improved"]},
            },
        )
        reg.promote(v.name)
    config = root / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    return config


def test_report_draws_loss_curves_and_version_metrics_in_one_self_contained_file(tmp_path, capsys):
    config = make_state(tmp_path)
    out = tmp_path / "report.html"
    assert main(["--config", str(config), "report", "--output", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["jobs"] == 2 and summary["versions"] == 2
    page = out.read_text()
    assert "<script src" not in page and "<link" not in page
    assert not re.search(r'(src|href)="https?://', page)  # nothing loaded from anywhere
    svgs = re.findall(r"<svg.*?</svg>", page, re.S)
    assert len(svgs) >= 2
    for svg in svgs:
        ET.fromstring(svg)  # well-formed SVG
    loss_chart = svgs[0]
    polylines = re.findall(r'<polyline points="([^"]+)"', loss_chart)
    assert [len(p.split()) for p in polylines] == [4, 3]  # one curve per job, NaN dropped
    nll_chart, improvement_chart, epsilon_chart = svgs[1:4]
    assert len(re.findall(r"<polyline", nll_chart)) == 2  # candidate and reference
    assert "0.12" in improvement_chart  # (2.5 - 2.2) / 2.5
    assert len(re.findall(r"<polyline", epsilon_chart)) == 2
    assert "v0002" in page and "(current)" in page


def test_report_without_any_state_says_so(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "nothing"}"\n')
    assert main(["--config", str(config), "report", "--output", str(tmp_path / "r.html")]) == 1
    assert "nothing to report" in capsys.readouterr().err


def test_report_on_a_buffer_only_lorad_ingest_opened_has_no_jobs(tmp_path, capsys):
    """Every command that writes a buffer makes the same schema, the jobs table included."""
    from lorad.buffer.store import Buffer

    state = tmp_path / "state"
    Buffer(state / "buffer.sqlite3").close()  # what `lorad ingest` leaves
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    out = tmp_path / "r.html"
    assert main(["--config", str(config), "report", "--output", str(out)]) == 0
    assert "No jobs yet." in out.read_text()


def test_report_on_a_database_lorad_did_not_make_says_so(tmp_path, capsys):
    import sqlite3

    state = tmp_path / "state"
    state.mkdir()
    sqlite3.connect(state / "buffer.sqlite3").execute("CREATE TABLE artifacts (id INTEGER)").connection.close()
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n')
    assert main(["--config", str(config), "report", "--output", str(tmp_path / "r.html")]) == 1
    assert "cannot open buffer" in capsys.readouterr().err
