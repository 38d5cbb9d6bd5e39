"""`lorad export` on the real fixture store: four formats that datasets and trl take as they are."""

from __future__ import annotations

import json

import pytest

from lorad.cli import main

FORMAT_KEYS = {
    "chat": {"messages", "metadata"},
    "alpaca": {"instruction", "input", "output", "metadata"},
    "dpo": {"prompt", "chosen", "rejected", "metadata"},
    "kto": {"prompt", "completion", "label", "metadata"},
}


@pytest.fixture(autouse=True)
def _structlog_back_to_defaults():
    """main() points structlog at this test's captured stderr; later tests must not write there."""
    import structlog

    yield
    structlog.reset_defaults()


@pytest.fixture
def config(tmp_path, fixture_store):
    path = tmp_path / "config.toml"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[[store.sources]]\nkind = "atomicguard"\npath = "{fixture_store}"\nname = "fixture"\n'
    )
    assert main(["--config", str(path), "ingest"]) == 0
    return path


def export(config, tmp_path, fmt, *extra) -> tuple[list[dict], dict]:
    out = tmp_path / f"{fmt}.jsonl"
    assert main(["--config", str(config), "--json", "export", "--format", fmt, "--output", str(out), *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()], out


def _counts(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", ["chat", "alpaca", "dpo", "kto"])
def test_every_format_writes_the_documented_keys_for_every_split(config, tmp_path, fmt, capsys):
    rows, _ = export(config, tmp_path, fmt, "--filter", "all", "--split", "all")
    counts = _counts(capsys)
    assert rows and counts["lines"] == len(rows)
    for row in rows:
        assert set(row) == FORMAT_KEYS[fmt]
        assert row["metadata"]["source"] == "fixture" and row["metadata"]["artifact_ids"]
    if fmt == "chat":
        assert all([m["role"] for m in r["messages"]][-2:] == ["user", "assistant"] for r in rows)
        assert counts["examples"] == 35  # every chain with an accepted answer
    if fmt == "dpo":
        assert counts["examples"] == 25  # every refinement
        per_chain = {}
        for r in rows:
            per_chain.setdefault(r["metadata"]["chain_id"], []).append(r)
        assert all(len(pairs) == pairs[0]["metadata"]["retries"] for pairs in per_chain.values())
        assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows)
    if fmt == "kto":
        assert counts["examples"] == 40  # exhausted chains give undesirable rows
        assert sum(r["label"] for r in rows) == 35 and sum(not r["label"] for r in rows) == 67


def test_counts_name_the_skipped_chains_and_the_split(config, tmp_path, capsys):
    rows, _ = export(config, tmp_path, "chat")  # default: all_successes, both conditionings, train split
    counts = _counts(capsys)
    assert counts["policy"] == "all_successes" and counts["conditioning"] == "both"
    assert counts["contamination"] == []
    assert (
        counts["skipped"]["not_selected"]
        + counts["skipped"].get("no_accepted_answer", 0)
        + counts["examples"]
        + counts["other_split"]
        == 40
    )
    assert rows and counts["examples"] > 0  # else the checks below hold of nothing
    assert all(r["metadata"]["outcome"] in ("refined", "first_try") and r["metadata"]["split"] == "train" for r in rows)
    refined = {r["metadata"]["chain_id"] for r in rows if r["metadata"]["outcome"] == "refined"}
    assert refined and len(refined) < counts["examples"]  # refinements and first-try successes both
    assert counts["lines"] == counts["examples"] + len(refined)  # a refinement gives two lines
    with_history = [r for r in rows if "Previous attempts and feedback" in r["messages"][-2]["content"]]
    assert {r["metadata"]["chain_id"] for r in with_history} == refined
    assert all(r["metadata"]["conditioning"] == "history" for r in with_history)


@pytest.mark.parametrize("conditioning", ["first_attempt", "history"])
def test_export_follows_the_conditioning_setting(config, tmp_path, capsys, conditioning):
    chat, _ = export(config, tmp_path, "chat", "--filter", "refinement", "--conditioning", conditioning)
    alpaca, _ = export(config, tmp_path, "alpaca", "--filter", "refinement", "--conditioning", conditioning)
    assert chat and len(chat) == len(alpaca) == len({r["metadata"]["chain_id"] for r in chat})
    for c, a in zip(chat, alpaca, strict=True):
        shows = "Previous attempts and feedback" in c["messages"][-2]["content"]
        assert shows == (conditioning == "history") == bool(a["input"])
        assert c["metadata"]["conditioning"] == a["metadata"]["conditioning"] == conditioning


def test_since_and_min_retries_narrow_the_selection(config, tmp_path, capsys):
    rows, _ = export(config, tmp_path, "chat", "--filter", "high_value", "--min-retries", "3", "--split", "all")
    assert rows and all(r["metadata"]["retries"] >= 3 for r in rows)
    _counts(capsys)
    rows, _ = export(config, tmp_path, "chat", "--filter", "all_successes", "--since", "2100-01-01")
    assert rows == []


def test_bad_filter_fails_with_usage_exit_and_names_the_token(config, tmp_path, capsys):
    code = main(["--config", str(config), "export", "--filter", "refinement and nope", "-o", str(tmp_path / "x")])
    assert code == 2
    assert "'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_prompt_template_role_opens_the_system_message(config, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"g_coder": {"role": "You are a careful Python coder.", "constraints": "x"}}))
    rows, _ = export(config, tmp_path, "chat", "--prompt-template", f"{prompts}:g_coder")
    system = rows[0]["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("You are a careful Python coder.")


def test_exported_files_load_with_datasets(config, tmp_path):
    from datasets import load_dataset

    for fmt in FORMAT_KEYS:
        _, path = export(config, tmp_path, fmt, "--filter", "all", "--split", "all")
        ds = load_dataset("json", data_files=str(path), split="train")
        assert set(ds.column_names) == FORMAT_KEYS[fmt]
        assert len(ds) > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from lorad.training.tiny import build_tiny_model

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _load(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def test_trl_sft_trainer_prepares_the_chat_export(config, tmp_path, tiny):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _, path = export(config, tmp_path, "chat")
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        report_to="none",
        max_length=64,
        per_device_train_batch_size=2,
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=str(tiny), args=args, train_dataset=_load(path), processing_class=AutoTokenizer.from_pretrained(tiny)
    )
    assert "input_ids" in trainer.train_dataset.column_names
    trainer.train()
    assert trainer.state.global_step == 1


def test_trl_dpo_trainer_prepares_the_dpo_export(config, tmp_path, tiny):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, path = export(config, tmp_path, "dpo")
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        report_to="none",
        max_length=512,
        per_device_train_batch_size=2,
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=str(tiny), args=args, train_dataset=_load(path), processing_class=AutoTokenizer.from_pretrained(tiny)
    )
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)
    trainer.train()
    assert trainer.state.global_step == 1


def test_trl_kto_trainer_prepares_the_kto_export(config, tmp_path, tiny):
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    _, path = export(config, tmp_path, "kto", "--filter", "refinement or exhausted")
    args = KTOConfig(
        output_dir=str(tmp_path / "kto"),
        max_steps=1,
        report_to="none",
        max_length=512,
        per_device_train_batch_size=4,
        use_cpu=True,
    )
    trainer = KTOTrainer(
        model=str(tiny), args=args, train_dataset=_load(path), processing_class=AutoTokenizer.from_pretrained(tiny)
    )
    assert {"prompt_ids", "completion_ids"} <= set(trainer.train_dataset.column_names)
    trainer.train()
    assert trainer.state.global_step == 1


def test_output_dash_writes_the_data_to_stdout_and_the_counts_to_stderr(config, capsys):
    assert main(["--config", str(config), "--json", "export", "--format", "kto", "--output", "-"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines and all(set(r) == FORMAT_KEYS["kto"] for r in lines)
    assert json.loads(err.strip().splitlines()[-1])["lines"] == len(lines)
