"""SIGKILL the training worker at random moments, during checkpoint saves and during the adapter
save too, then run it again on the same job directory (a resume) until it finishes.

After every kill: each checkpoint a resume may trust loads completely; the next run continues
from the newest of them; the cycle never promotes what a killed worker left behind. At the end
`current` points at a version whose sha256s verify and whose adapter loads.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import training_sections

from lorad import config, cycle, release
from lorad.buffer.store import Buffer
from lorad.sources import open_sources
from lorad.sources.ingest import ingest
from lorad.training import jobdir as jobfile
from lorad.training.checkpoints import CHECKPOINT_MARKER, complete_checkpoints

FIXTURES = Path(__file__).parent.parent / "fixtures"
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONUNBUFFERED": "1",
}
MAX_STEPS = 24


def settings_for(root: Path, model: Path) -> config.Settings:
    return config.loads(f"""
[daemon]
state_dir = "{root / "state"}"
[[store.sources]]
kind = "atomicguard"
path = "{FIXTURES / "atomicguard-store"}"
[selection]
policy = "all_successes"
heldout_fraction = 0.3
max_history = 1
max_artifact_chars = 300
[training]
base_model = "{model}"
max_steps = {MAX_STEPS}
save_steps = 1
batch_size = 2
learning_rate = 0.01
max_seq_length = 128
quantization = "none"
gradient_checkpointing = false
lora_r = 4
lora_alpha = 16
lora_dropout = 0.0
[evaluation]
min_improvement = 0.0
min_heldout_examples = 2
eval_batch_size = 4
""")


def start(job_dir: Path) -> subprocess.Popen:
    argv = jobfile.worker_command(job_dir, jobfile.read_job(job_dir))
    with open(job_dir / "worker.log", "ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, **WORKER_ENV)
        )


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


def wait_for_record(job_dir: Path, proc: subprocess.Popen, since: int, match, timeout: float = 120) -> dict | None:
    """The first progress record of this run (after byte ``since``) that ``match`` accepts; None
    when the worker ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record, _ in jobfile.iter_progress(job_dir, since):
            if match(record):
                return record
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    raise AssertionError(f"no matching progress record within {timeout} s")


def progress_end(job_dir: Path) -> int:
    path = job_dir / jobfile.PROGRESS_FILE
    return path.stat().st_size if path.exists() else 0


def check_checkpoints(job_dir: Path) -> list[int]:
    """Every checkpoint a resume may trust loads completely and is the step its name says."""
    import torch
    from safetensors.torch import load_file

    steps = []
    for ckpt in complete_checkpoints(job_dir):
        step = int(ckpt.name.split("-")[1])
        assert json.loads((ckpt / CHECKPOINT_MARKER).read_text())["step"] == step
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
        assert load_file(ckpt / "adapter_model.safetensors")
        torch.load(ckpt / "optimizer.pt", weights_only=True)
        torch.load(ckpt / "scheduler.pt", weights_only=True)
        steps.append(step)
    return steps


def check_adapter_whole_or_absent(job_dir: Path) -> None:
    from safetensors.torch import load_file

    adapter = job_dir / jobfile.ADAPTER_DIR
    if not adapter.exists():
        return
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert load_file(adapter / "adapter_model.safetensors")  # every tensor there, readable


def kill_moments(rng: random.Random) -> list[tuple[str, float]]:
    """(what to wait for, extra delay): kills in training steps, right after and around checkpoint
    publishing, during the final adapter save, and during evaluation."""
    moments = [("step", rng.uniform(0.0, 0.3)) for _ in range(3)]
    moments += [("checkpointed", d) for d in (0.0, 0.002, 0.005, 0.02, rng.uniform(0.0, 0.1))]
    moments += [("saving", d) for d in (0.0, 0.005, 0.02)]
    moments += [("evaluating", rng.uniform(0.0, 0.02))]
    return moments


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_worker_killed_at_random_moments_resumes_from_complete_checkpoints_and_never_promotes_a_partial_adapter(
    tmp_path, tiny_model, monkeypatch
):
    for k, v in WORKER_ENV.items():
        monkeypatch.setenv(k, v)
    rng = random.Random(3)
    s = settings_for(tmp_path, tiny_model)
    with Buffer(s.buffer_path) as buffer:
        ingest(buffer, open_sources(s.store))
        registry = release.open_registry(s, buffer)
        job_dir = Path(cycle.prepare(s, buffer, "killed", since=0))

        kills, resumed_from = 0, []
        newest_before = 0
        for what, delay in kill_moments(rng):
            since = progress_end(job_dir)
            proc = start(job_dir)
            try:
                if what == "step":
                    target = rng.randint(newest_before + 1, min(newest_before + 3, MAX_STEPS))

                    def match(r, t=target):
                        return r.get("stage") == "training" and r.get("loss") is not None and r["step"] >= t
                else:

                    def match(r, w=what):
                        return r.get("stage") == w

                first = wait_for_record(job_dir, proc, since, lambda r: r.get("stage") == "training")
                assert first is not None, (job_dir / "worker.log").read_text()[-3000:]
                # The run starts from the newest complete checkpoint there was when it started.
                assert first["step"] == newest_before, (first, newest_before)
                resumed_from.append(first["step"])
                if wait_for_record(job_dir, proc, since, match) is not None:
                    time.sleep(delay)
            finally:
                kill_group(proc)
            kills += proc.returncode == -signal.SIGKILL
            steps = check_checkpoints(job_dir)
            newest_before = steps[-1] if steps else 0
            check_adapter_whole_or_absent(job_dir)
            result = jobfile.read_result(job_dir)
            if result and result.status == "succeeded":
                break  # the kill came after the worker had finished: nothing left to interrupt
            # What a killed worker left behind is never promoted.
            outcome = cycle.conclude(s, buffer, job_dir)
            assert not outcome.promoted and outcome.version is None
            assert registry.current() is None and registry.versions() == []

        assert kills >= 10, f"only {kills} runs were killed"
        assert len(set(resumed_from)) >= 4, resumed_from  # resumed from many different checkpoints

        proc = start(job_dir)
        proc.wait(300)
        assert proc.returncode == jobfile.EXIT_OK, (job_dir / "worker.log").read_text()[-3000:]
        result = jobfile.read_result(job_dir)
        assert result.steps == MAX_STEPS  # no step past the end after resuming at the last one
        # Killed during the adapter save or evaluation, each run resumed from the newest complete
        # checkpoint (the last step itself is not checkpointed: the adapter is saved right after).
        assert resumed_from[-1] >= MAX_STEPS - 1, resumed_from
        outcome = cycle.conclude(s, buffer, job_dir)
        assert outcome.status in ("promoted", "rejected"), outcome.as_dict()
        if not outcome.promoted:  # the gate's call; promote by hand to check what current serves
            release.promote(s, buffer, outcome.version, reason="fault test")
        current = registry.current()
        assert current == outcome.version
        assert registry.verify(current) == []

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, str(registry.path_of(current)))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def _job(d, job_id: str) -> dict:
    return d.request("job", job_id=job_id)["job"]


def _runs(job_dir: Path) -> list[list[dict]]:
    """progress.jsonl split into the worker runs that wrote it (each begins with "preparing")."""
    runs: list[list[dict]] = []
    for record, _ in jobfile.iter_progress(job_dir):
        if record.get("stage") == jobfile.STAGE_PREPARING:
            runs.append([])
        runs[-1].append(record)
    return runs


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_a_worker_killed_alone_in_the_grpo_phase_pauses_its_job_which_resumes_from_its_checkpoints(
    daemon_factory, tiny_model
):
    """Issue 23, finding 9: kill -9 of the worker alone under the daemon (sft+grpo, in GRPO).

    An earlier worker of the job had paused on SIGTERM (a daemon restart), so result.json said
    "paused on SIGTERM": the killed run's job was failed with that stale reason, and the next
    job started again from SFT step 1. Now the job is paused ("worker killed (signal 9)") and
    resumed on its directory: the SFT phase's adapter is reused and GRPO goes on from its
    newest checkpoint."""
    sections = training_sections(tiny_model, max_steps=6, save_steps=1)
    sections["training"].update(
        method="sft+grpo", grpo_steps=30, num_generations=2, max_completion_length=8, warm_start=False
    )
    sections["evaluation"].update(
        guard_command=[sys.executable, str(FIXTURES / "task_guard.py")], max_new_tokens=8, min_heldout_examples=1
    )
    d = daemon_factory(env=WORKER_ENV, **sections)
    job_id = d.request("train_now")["job"]["job_id"]
    in_sft = d.wait_for(
        lambda: (
            (j := _job(d, job_id))["state"] == "training"
            and (j.get("progress") or {}).get("phase") == "sft"
            and ((j.get("progress") or {}).get("step") or 0) >= 2
            and j
        ),
        timeout=180,
        what="the SFT phase to train",
    )
    job_dir = Path(in_sft["job_dir"])
    assert d.stop() == 0  # the worker pauses on SIGTERM, and says so in result.json
    assert jobfile.read_result(job_dir).reason == "paused on SIGTERM"
    since = progress_end(job_dir)
    d.start()  # a manual job resumes at once
    deadline = time.monotonic() + 180
    # A GRPO checkpoint of this second run (read from the files, not the socket: GRPO steps are quick).
    while not any(
        r.get("stage") == jobfile.STAGE_CHECKPOINTED and r.get("phase") == "grpo"
        for r, _ in jobfile.iter_progress(job_dir, since)
    ):
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.01)
    os.killpg(int((job_dir / "worker.pid").read_text()), signal.SIGKILL)  # the worker alone; the daemon lives on
    killed_at = int(complete_checkpoints(job_dir, "grpo")[-1].name.split("-")[1])
    assert _job(d, job_id)["runs"] == 2
    ended = d.wait_for(
        lambda: (j := _job(d, job_id))["state"] in ("promoted", "rejected", "failed") and j,
        timeout=300,
        what="the job to end",
    )
    states = [(e["state"], e["reason"]) for e in ended["events"]]
    assert ("paused", "worker killed (signal 9)") in states, states
    assert ended["state"] in ("promoted", "rejected"), (ended["reason"], states)
    assert ended["runs"] == 3 and len(d.request("jobs")["jobs"]) == 1  # the same job, not a new one
    assert [v["version"] for v in d.request("history")["versions"]] == [ended["version"]]
    runs = _runs(job_dir)
    assert len(runs) == 3
    third = [r for r in runs[2] if r.get("stage") == jobfile.STAGE_TRAINING]
    assert {r.get("phase") for r in third} == {"grpo"}  # the SFT phase's adapter was reused
    assert third[0]["resumed"] and third[0]["step"] >= killed_at, (third[0], killed_at)
    result = jobfile.read_result(job_dir)
    assert [(p["method"], p["steps"]) for p in result.phases] == [("sft", 6), ("grpo", 30)]
    assert result.phases[1]["resumed_from"].startswith(str(job_dir / "checkpoints" / "grpo" / "step-"))
