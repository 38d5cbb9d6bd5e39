"""`lorad doctor` prints the environment and the estimate for the configured model."""

from __future__ import annotations

import json


def test_doctor_reports_environment_and_whether_the_configured_run_fits(tmp_path, capsys):
    from lorad.cli import main
    from lorad.training.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[training]\nbase_model = "{model}"\nbatch_size = 2\nmax_seq_length = 64\n'
    )
    assert main(["--config", str(cfg), "--json", "doctor"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cuda_available"] is False and report["device"]["kind"] == "cpu"
    assert report["device"]["free_bytes"] > 0 and "bitsandbytes" in report
    assert report["state_dir"]["disk_free_bytes"] > 0
    est = report["estimate"]
    assert est["fits"] is True and est["dtype"] == "float32" and est["parameters"] > 0

    cfg.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[training]\nbase_model = "{model}"\nbatch_size = 4096\nmax_seq_length = 65536\n'
    )
    assert main(["--config", str(cfg), "doctor"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "suggestion: batch_size = " in text


def test_doctor_names_a_missing_base_model(tmp_path, capsys):
    from lorad.cli import main

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n[training]\nbase_model = "{tmp_path}/nope.gguf"\n')
    assert main(["--config", str(cfg), "doctor"]) == 1
    assert f"base model GGUF file not found: {tmp_path}/nope.gguf" in capsys.readouterr().out


def test_doctor_prints_the_per_rank_estimate_of_an_fsdp2_config(tmp_path, capsys):
    from lorad.cli import main
    from lorad.training.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    fsdp2 = tmp_path / "fsdp2.yaml"
    fsdp2.write_text(
        "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n"
    )
    cfg = tmp_path / "config.toml"
    base = f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[training]\nbase_model = "{model}"\nbatch_size = 2\n'
    cfg.write_text(base)
    assert main(["--config", str(cfg), "--json", "doctor"]) == 0
    whole = json.loads(capsys.readouterr().out)["estimate"]
    cfg.write_text(base + f'processes = 2\naccelerate_config = "{fsdp2}"\n')
    assert main(["--config", str(cfg), "--json", "doctor"]) == 0
    per_rank = json.loads(capsys.readouterr().out)["estimate"]
    assert per_rank["shards"] == 2 and whole["shards"] == 1
    assert per_rank["lora"] == -(-whole["lora"] // 2)
    assert per_rank["weights"] == -(-whole["weights"] // 2) + per_rank["gathered"]
    assert per_rank["activations"] == whole["activations"]
    assert main(["--config", str(cfg), "doctor"]) == 0
    assert "per rank of 2 (FSDP2: 1/2 of the weights and 1/2 of LoRA + optimizer" in capsys.readouterr().out
