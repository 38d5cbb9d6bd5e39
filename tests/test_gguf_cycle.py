"""A training cycle with gguf and ollama publish tables: the GGUFs are part of the immutable version."""

from __future__ import annotations

import json

import pytest

from lorad import cli, config, cycle, release
from lorad.buffer.store import Buffer
from test_cycle import config_text
from test_gguf_export import read, write_base_gguf
from test_ollama import FakeOllama


@pytest.fixture
def one_thread(monkeypatch):
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def test_a_cycle_writes_adapter_gguf_into_the_version_and_publishes_it_to_ollama(tmp_path, one_thread, capsys):
    from lorad.training.tiny import build_tiny_model

    tiny = build_tiny_model(tmp_path / "tiny", hidden_size=32, vocab_size=512)
    base_gguf = write_base_gguf(tmp_path / "tiny.gguf", tiny)
    with FakeOllama() as server:
        text = config_text(
            tmp_path,
            str(tiny),
            steps=20,
            guard=False,
            evaluation=f"""
[[publish]]
kind = "gguf"
base = "{base_gguf}"
required = true
[[publish]]
kind = "ollama"
url = "{server.url}"
base = "{base_gguf}"
retries = 0
[[publish]]
kind = "ollama"
url = "{server.url}"
base = "{base_gguf}"
name_prefix = "merged"
ollama_mode = "merged"
retries = 0
""",
        )
        settings = config.loads(text)
        outcome = cycle.run_now(settings)
        reg = release.open_registry(settings)
        version = reg.get(outcome.version)
        # the files are the version's: listed with their sha256, verified like the rest
        assert {"adapter.gguf", "Modelfile"} <= set(version.record["files"]) and reg.verify(version.name) == []
        assert version.record["gguf"]["arch"] == "llama" and version.record["gguf"]["base"] == str(base_gguf)
        assert version.record["gguf"]["sha256"] == version.record["files"]["adapter.gguf"]
        fields, tensors = read(version.path / "adapter.gguf")
        assert fields["adapter.lora.alpha"] == pytest.approx(64.0) and len(tensors) == 28
        assert (version.path / "Modelfile").read_text() == f"FROM {base_gguf}\nADAPTER ./adapter.gguf\n"
        # merged.gguf too (an ollama table's mode is merged), a version file; the job keeps no copy
        merged = version.record["gguf"]["merged"]
        assert merged["sha256"] == version.record["files"]["merged.gguf"] and merged["merged"] == 14
        assert not (settings.state.jobs / outcome.job_id / "adapter" / "merged.gguf").exists()
        if not outcome.promoted:  # the gate's call on a tiny model; the hooks run on a promotion either way
            with Buffer(settings.buffer_path) as buffer:
                release.promote(settings, buffer, version.name)
        else:
            assert [r["ok"] for r in outcome.publish] == [True, True, True]
        assert server.models["lorad:latest"] == server.models[f"lorad-{version.name}:latest"]
        assert server.models["lorad:latest"]["adapters"] == {
            "adapter.gguf": "sha256:" + version.record["files"]["adapter.gguf"]
        }
        assert server.models["merged:latest"] == {"files": {"merged.gguf": "sha256:" + merged["sha256"]}}

    # by hand: the same tensors, and a Modelfile beside the output
    out = tmp_path / "exported" / "v.gguf"
    out.parent.mkdir()
    (tmp_path / "config.toml").write_text(text)
    capsys.readouterr()
    code = cli.main(
        [
            "--config",
            str(tmp_path / "config.toml"),
            "--json",
            "export-adapter",
            version.name,
            "--format",
            "gguf",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tensors"] == 28 and printed["modelfile"] == str(tmp_path / "exported" / "v.Modelfile")
    assert (tmp_path / "exported" / "v.Modelfile").read_text() == f"FROM {base_gguf}\nADAPTER ./v.gguf\n"
    assert read(out)[1].keys() == tensors.keys()
    # a version whose files were changed is refused, and exits 1 with the reason
    (version.path / "adapter_config.json").chmod(0o640)
    (version.path / "adapter_config.json").write_text("{}")
    assert (
        cli.main(
            [
                "--config",
                str(tmp_path / "config.toml"),
                "export-adapter",
                version.name,
                "--output",
                str(tmp_path / "x.gguf"),
            ]
        )
        == 1
    )
    assert "sha256 does not match" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
