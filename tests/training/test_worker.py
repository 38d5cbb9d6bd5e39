"""The worker end to end, as a subprocess on a job directory (the way the daemon runs it)."""

from __future__ import annotations

import json
import math
import signal
import time

import pytest
from training_helpers import dpo_row, kto_row, output, run_worker, start_worker, training_starts

from lorad.training import jobdir as jobfile
from lorad.training.checkpoints import CHECKPOINT_MARKER, complete_checkpoints


def _losses(job_dir) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r, _ in jobfile.iter_progress(job_dir)
        if r["stage"] == "training" and r.get("loss") is not None
    }


def _progress_end(job_dir) -> int:
    path = job_dir / jobfile.PROGRESS_FILE
    return path.stat().st_size if path.exists() else 0


def _wait_for_step(job_dir, proc, step: int, since: int = 0, timeout: float = 120) -> None:
    """Wait until this run (progress records after offset ``since``) has trained ``step`` steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker ended early:\n{output(job_dir)}")
        for record, _ in jobfile.iter_progress(job_dir, since):
            if record.get("stage") == "training" and record.get("loss") is not None and record["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"worker did not reach step {step}")


def test_worker_trains_saves_the_adapter_and_reports(make_job):
    job_dir = make_job(evaluate=True)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert result.status == "succeeded" and result.error is None
    assert result.steps == 6 and result.total_steps == 6 and result.tokens > 0
    assert math.isfinite(result.final_loss) and result.health["ok"]
    # Fast by default where exact: packed (checked on the model), the LM head on the answer only,
    # torch threads as OMP_NUM_THREADS says (the test environment sets 1).
    assert result.speed["packing"] is True and result.speed["packing_reason"].startswith("exact")
    assert result.speed["completion_head"] is True and result.speed["threads"] == 1
    assert result.speed["gradient_checkpointing"] is False  # CPU, and the run fits without it
    adapter = job_dir / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((adapter / "adapter_config.json").read_text())
    # vLLM's --lora-modules needs the concrete module names, not the "all-linear" shorthand.
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # Candidate and the bare base model scored on the same held-out rows.
    assert set(result.metrics) == {"candidate", "active"}
    assert result.metrics["candidate"]["tokens"] == result.metrics["active"]["tokens"] > 0
    records = [r for r, _ in jobfile.iter_progress(job_dir)]
    assert records[-1]["stage"] == "succeeded"
    steps = [r for r in records if r["stage"] == "training" and r.get("loss") is not None]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert r["total_steps"] == 6 and r["tokens_per_s"] > 0 and r["eta_s"] >= 0
        assert r["learning_rate"] > 0
    # save_steps=2: only the newest two complete checkpoints are kept, and none is written at
    # the last step (the adapter is).
    assert [p.name for p in complete_checkpoints(job_dir)] == ["step-2", "step-4"]


def test_rejects_learning_rate_outside_sane_range_before_loading_anything(make_job):
    job_dir = make_job(learning_rate=0.5)
    code, result, _ = run_worker(job_dir)
    assert code == jobfile.EXIT_FAILED
    assert result.status == "failed"
    assert "learning_rate 0.5 is outside the sane range" in result.error
    assert result.steps == 0 and not (job_dir / "adapter").exists()


def test_refuses_run_that_does_not_fit_in_memory_and_suggests_smaller_batch(make_job):
    job_dir = make_job(batch_size=4096, max_seq_length=65536)
    code, result, _ = run_worker(job_dir)
    assert code == jobfile.EXIT_FAILED
    assert "the run needs about" in result.error
    assert "try training.batch_size = " in result.error
    assert not (job_dir / "checkpoints").exists()


def test_nan_loss_fails_job_with_reason_and_saves_nothing(make_job, tmp_path, tiny_model_dir):
    """A base model whose final norm is NaN gives a NaN loss at the first step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(broken)
    job_dir = make_job(base_model=str(broken), save_steps=1)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_FAILED, out[-2000:]
    assert result.error == "loss became nan at step 1"
    assert complete_checkpoints(job_dir) == []
    assert not (job_dir / "adapter").exists()


def test_missing_base_model_path_fails_naming_the_path(make_job, tmp_path):
    missing = tmp_path / "no-such-model"
    code, result, _ = run_worker(make_job(base_model=str(missing)))
    assert code == jobfile.EXIT_FAILED
    assert result.error == f"base model path not found: {missing}"


def test_sigterm_pauses_and_resume_continues_the_same_loss_curve(make_job):
    """Interrupted + resumed gives the same per-step losses as one uninterrupted run."""
    spec = dict(max_steps=16, save_steps=100, learning_rate=5e-3)
    reference = make_job(**spec)
    code, _, out = run_worker(reference)
    assert code == jobfile.EXIT_OK, out[-2000:]
    expected = _losses(reference)

    job_dir = make_job(**spec)
    proc = start_worker(job_dir)
    _wait_for_step(job_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == jobfile.EXIT_PAUSED, output(job_dir)
    paused = jobfile.read_result(job_dir)
    assert paused.status == "paused" and paused.reason == "paused on SIGTERM"
    stopped_at = paused.steps
    assert 3 <= stopped_at < 16
    # The pause saved a checkpoint at the step it stopped, although save_steps is 100.
    assert [p.name for p in complete_checkpoints(job_dir)] == [f"step-{stopped_at}"]

    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-2000:]
    assert result.steps == 16 and result.resumed_from.endswith(f"step-{stopped_at}")
    starts = [(r["step"], r["resumed"]) for r in training_starts(job_dir)]
    assert starts == [(0, False), (stopped_at, True)]
    assert result.tokens == jobfile.read_result(reference).tokens
    got = _losses(job_dir)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4, abs=1e-5), step


def test_window_end_pauses_the_job(make_job):
    job_dir = make_job(max_steps=6, window_end=time.time() - 1)
    code, result, _ = run_worker(job_dir)
    assert code == jobfile.EXIT_PAUSED
    assert result.reason == "paused at the end of the training window"
    assert result.steps == 1 and [p.name for p in complete_checkpoints(job_dir)] == ["step-1"]


def test_sigint_cancels_the_job(make_job):
    job_dir = make_job(max_steps=200, save_steps=1000)
    proc = start_worker(job_dir)
    _wait_for_step(job_dir, proc, 2)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert proc.returncode == jobfile.EXIT_CANCELLED, output(job_dir)
    result = jobfile.read_result(job_dir)
    assert result.status == "cancelled" and result.reason == "cancelled on SIGINT"
    assert not (job_dir / "adapter").exists()


@pytest.mark.faults
def test_sigkill_during_checkpoint_saves_never_leaves_a_checkpoint_that_loads_wrongly(make_job):
    """Kill -9 at several moments while a checkpoint is saved every step; whatever a resume
    would trust must load completely and say the step its name says."""
    import torch
    from safetensors.torch import load_file

    job_dir = make_job(max_steps=400, save_steps=1)
    for delay in (0.0, 0.13, 0.29):
        since = _progress_end(job_dir)
        proc = start_worker(job_dir)
        _wait_for_step(job_dir, proc, 1, since)
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        for ckpt in complete_checkpoints(job_dir):
            step = int(ckpt.name.split("-")[1])
            assert json.loads((ckpt / CHECKPOINT_MARKER).read_text())["step"] == step
            state = json.loads((ckpt / "trainer_state.json").read_text())
            assert state["global_step"] == step
            assert load_file(ckpt / "adapter_model.safetensors")
            torch.load(ckpt / "optimizer.pt", weights_only=True)
            torch.load(ckpt / "scheduler.pt", weights_only=True)
            torch.load(ckpt / "rng_state.pth", weights_only=False)
    # And a resume from what is left runs on from the newest complete checkpoint.
    last = complete_checkpoints(job_dir)[-1]
    spec = jobfile.read_job(job_dir)
    step = int(last.name.split("-")[1])
    jobfile.atomic_write(job_dir / "job.json", json.dumps(spec.as_dict() | {"max_steps": step + 2}))
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-2000:]
    assert result.resumed_from == str(last) and result.steps == step + 2


def test_dpo_run_trains_an_adapter_from_preference_rows(make_job):
    job_dir = make_job(method="dpo", rows=[dpo_row(i) for i in range(8)], max_steps=3)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert result.method == "dpo" and math.isfinite(result.final_loss)
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_kto_run_trains_an_adapter_from_labelled_rows(make_job):
    job_dir = make_job(method="kto", rows=[kto_row(i) for i in range(16)], max_steps=3, batch_size=4)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert result.method == "kto" and math.isfinite(result.final_loss)
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_job_paused_at_its_last_step_resumes_to_the_adapter_without_training_more(make_job):
    job_dir = make_job(max_steps=1, window_end=time.time() - 1)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_PAUSED, out
    assert [p.name for p in complete_checkpoints(job_dir)] == ["step-1"]
    spec = jobfile.read_job(job_dir)
    jobfile.atomic_write(job_dir / "job.json", json.dumps(spec.as_dict() | {"window_end": None}))
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out
    assert result.steps == 1 and result.resumed_from.endswith("step-1")
    assert math.isfinite(result.final_loss) and result.tokens_per_s == 0
    assert (job_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(_losses(job_dir)) == [1]
