"""FSDP2 (an accelerate config with fsdp_version: 2): two gloo processes on the CPU, the tiny model.

The multi-process tests run the real worker under `accelerate launch` as the daemon does; the
one-process job they compare with has the same global batch (4 rows a step: batch_size 4 in
one process, 2 on each of two ranks), so both see the same rows in the same order and their
adapters differ only by the order floating-point sums are taken in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import FSDP2_CONFIG, output, run_worker, training_starts, worker_env

from lorad.training import jobdir as jobfile
from lorad.training import sharding
from lorad.training.checkpoints import complete_checkpoints

torch.set_num_threads(1)

# Held-out loss of the two-process adapter against the one-process one, relative to how far
# training moved the loss from the base's. Rounding (a reduce-scatter's sums in another order)
# gives ~1e-6 of that here; an adapter a rank's slice was resumed from gives ~1e-1 (checked below).
AGREEMENT = 1e-3


@pytest.fixture
def fsdp2_job(make_job, tmp_path):
    """make_job for two FSDP2 ranks (batch_size 2 each unless overridden)."""
    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)

    def make(**overrides):
        return make_job(**({"processes": 2, "accelerate_config": str(config), "batch_size": 2} | overrides))

    return make


def _start(job_dir):
    """The worker in a session of its own (the way the supervisor starts it)."""
    with open(job_dir / "worker.log", "a") as log:
        return subprocess.Popen(
            jobfile.worker_command(job_dir, jobfile.read_job(job_dir)),
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_for(proc, job_dir, ready, timeout=240):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, output(job_dir)
        assert time.monotonic() < deadline, output(job_dir)
        time.sleep(0.1)


def _step(job_dir) -> int:
    return (jobfile.last_progress(job_dir) or {}).get("step") or 0


def _losses(job_dir) -> dict[int, float]:
    """step -> loss of the training records (the last run's, where a step was run twice)."""
    return {r["step"]: r["loss"] for r, _ in jobfile.iter_progress(job_dir) if r.get("loss") is not None}


def _heldout_nll(model_dir, adapter_weights: dict | None, adapter_dir, rows) -> float:
    """Held-out NLL of base + the adapter in ``adapter_dir`` (its tensors replaced by
    ``adapter_weights`` when given), or of the bare base when ``adapter_dir`` is None."""
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorad.evaluation.metrics import encode_example, score_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
        if adapter_weights is not None:
            set_peft_model_state_dict(model, adapter_weights)
    encoded = [encode_example(tokenizer, r, 64) for r in rows]
    return score_loss(model, tokenizer, encoded, batch_size=8)["nll"]


# sitecustomize for the worker's processes: the gather replaced by what accelerate #4206 saved,
# each rank's own shard of the adapter's tensors taken for the whole.
RANK_SLICE = """
import lorad.training.sharding as sharding


def _rank_slice(model):
    return {
        n: (p.to_local() if hasattr(p, "to_local") else p).detach().cpu().clone()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


sharding.full_adapter_state = _rank_slice
"""


def _shapes(adapter_dir) -> dict:
    return {k: tuple(v.shape) for k, v in load_file(adapter_dir / sharding.ADAPTER_WEIGHTS).items()}


def _whole_shapes(model_dir) -> dict:
    """Every LoRA tensor of the job's adapter on the tiny model, with its whole shape."""
    from lorad.training import lora

    model, _ = lora.load_model(str(model_dir), lora.precision("cpu", "float32", False))
    model = lora.attach_adapter(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    return sharding.adapter_shapes(model)


# -- one process: the checks the sharded path relies on ------------------------------------------


def test_check_adapter_refuses_a_slice_a_missing_tensor_and_non_finite_values(tmp_path):
    whole = {"m.q_proj.lora_A.weight": torch.ones(4, 32), "m.q_proj.lora_B.weight": torch.zeros(32, 4)}
    expected = {k: tuple(v.shape) for k, v in whole.items()}
    path = tmp_path / "adapter_model.safetensors"
    save_file(whole, path)
    sharding.check_adapter(path, expected)
    # What accelerate #4206 saved: rank 0's shard of dim 0.
    save_file({k: v[: v.shape[0] // 2].contiguous() for k, v in whole.items()}, path)
    with pytest.raises(sharding.AdapterIncomplete, match=r"2 with a partial shape \(m.q_proj.lora_A.weight: \(2, 32\)"):
        sharding.check_adapter(path, expected)
    save_file({"m.q_proj.lora_A.weight": whole["m.q_proj.lora_A.weight"]}, path)
    with pytest.raises(sharding.AdapterIncomplete, match=r"1 of 2 LoRA tensors missing \(m.q_proj.lora_B.weight\)"):
        sharding.check_adapter(path, expected)
    save_file(whole | {"m.q_proj.lora_B.weight": torch.full((32, 4), float("nan"))}, path)
    with pytest.raises(sharding.AdapterIncomplete, match=r"1 with non-finite values"):
        sharding.check_adapter(path, expected)


def test_adapter_shapes_names_the_tensors_as_peft_saves_them(tiny_model_dir, tmp_path):
    from lorad.training import lora

    model, _ = lora.load_model(str(tiny_model_dir), lora.precision("cpu", "float32", False))
    model = lora.attach_adapter(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    model.save_pretrained(tmp_path / "adapter")
    assert sharding.adapter_shapes(model) == _shapes(tmp_path / "adapter")
    assert sharding.adapter_shapes(model)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    sharding.check_adapter(tmp_path / "adapter" / sharding.ADAPTER_WEIGHTS, sharding.adapter_shapes(model))


def test_fsdp2_is_read_from_the_launchers_environment():
    assert sharding.active({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert not sharding.active({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert not sharding.active({})
    assert sharding.offloaded({"FSDP_OFFLOAD_PARAMS": "true"}) and not sharding.offloaded({})


# -- two gloo processes -----------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_two_fsdp2_ranks_give_the_adapter_one_process_gives(make_job, fsdp2_job, tiny_model_dir):
    """Held-out loss within AGREEMENT of the one-process job's; the adapter whole in every
    checkpoint and in adapter/; progress from rank 0 alone; the estimate per rank."""
    single = make_job(batch_size=4, evaluate=True)
    code, one, out = run_worker(single)
    assert code == jobfile.EXIT_OK, out
    job_dir = fsdp2_job(evaluate=True)
    code, two, out = run_worker(job_dir, timeout=600)
    assert code == jobfile.EXIT_OK, out
    assert two.processes == 2 and two.memory_estimate["shards"] == 2
    assert two.memory_estimate["lora"] < one.memory_estimate["lora"]
    assert [r["step"] for r, _ in jobfile.iter_progress(job_dir) if r.get("loss") is not None] == list(range(1, 7))

    shapes = _whole_shapes(tiny_model_dir)
    assert _shapes(single / "adapter") == _shapes(job_dir / "adapter") == shapes
    for checkpoint in complete_checkpoints(job_dir):  # step-2, step-4: what a resume would load
        for name in (sharding.ADAPTER_WEIGHTS, sharding.FSDP_MODEL_FILE):
            sharding.check_adapter(checkpoint / name, shapes)

    heldout = jobfile.read_jsonl(single / jobfile.HELDOUT_FILE)
    base = _heldout_nll(tiny_model_dir, None, None, heldout)
    nll_one = _heldout_nll(tiny_model_dir, None, single / "adapter", heldout)
    nll_two = _heldout_nll(tiny_model_dir, None, job_dir / "adapter", heldout)
    moved = base - nll_one
    assert moved > 0.01, (base, nll_one)  # training did move it, so the comparison means something
    assert abs(nll_two - nll_one) <= AGREEMENT * moved, (base, nll_one, nll_two)
    # What the worker scored (for the gate) is the adapter/ it saved, reloaded in one process.
    assert two.metrics["candidate"]["nll"] == pytest.approx(nll_two, rel=1e-5)
    assert two.metrics["active"]["nll"] == pytest.approx(base, rel=1e-5)
    # The tolerance tells a slice apart: rank 1's half of every lora_B back at its init (zero).
    weights = load_file(job_dir / "adapter" / sharding.ADAPTER_WEIGHTS)
    for k, v in weights.items():
        if "lora_B" in k:
            v[v.shape[0] // 2 :] = 0
    sliced = _heldout_nll(tiny_model_dir, weights, job_dir / "adapter", heldout)
    assert abs(sliced - nll_one) > 10 * AGREEMENT * moved, (nll_one, sliced)
    one_weights = load_file(single / "adapter" / sharding.ADAPTER_WEIGHTS)
    two_weights = load_file(job_dir / "adapter" / sharding.ADAPTER_WEIGHTS)
    gap = max((one_weights[n] - two_weights[n]).abs().max().item() for n in one_weights)
    print(  # the figures, for -s
        f"held-out nll: base {base:.6f}, one process {nll_one:.10f}, two FSDP2 ranks {nll_two:.10f} "
        f"(adapters differ by at most {gap:.1e}; "
        f"|difference| {abs(nll_two - nll_one):.1e}, tolerance {AGREEMENT * moved:.1e}), rank 1's half of "
        f"lora_B at its init {sliced:.6f}"
    )
    print(
        "memory estimate (bytes): one process "
        + ", ".join(f"{k} {one.memory_estimate[k]:,}" for k in ("total", "weights", "lora", "activations"))
        + "; per FSDP2 rank of 2 "
        + ", ".join(f"{k} {two.memory_estimate[k]:,}" for k in ("total", "weights", "gathered", "lora", "activations"))
    )


@pytest.mark.timeout(900)
def test_fsdp2_run_paused_by_sigterm_resumes_with_the_whole_adapter(make_job, fsdp2_job, tiny_model_dir):
    """Paused at some step k, the run resumes from step-k and continues the one-process run's
    loss curve step for step: the adapter it resumed is the whole one, not rank 0's slice."""
    single = make_job(batch_size=4, max_steps=40, save_steps=1000)
    code, _, out = run_worker(single)
    assert code == jobfile.EXIT_OK, out
    reference = _losses(single)

    job_dir = fsdp2_job(max_steps=40, save_steps=1000)
    proc = _start(job_dir)
    _wait_for(proc, job_dir, lambda: _step(job_dir) >= 3)
    os.killpg(proc.pid, signal.SIGTERM)  # the way the daemon pauses a job: its whole group
    proc.wait(timeout=240)
    assert proc.returncode == jobfile.EXIT_PAUSED, output(job_dir)
    paused = jobfile.read_result(job_dir)
    k = paused.steps
    assert paused.status == "paused" and 3 <= k < 40
    [checkpoint] = complete_checkpoints(job_dir)
    assert checkpoint.name == f"step-{k}"
    shapes = _whole_shapes(tiny_model_dir)
    for name in (sharding.ADAPTER_WEIGHTS, sharding.FSDP_MODEL_FILE):
        sharding.check_adapter(checkpoint / name, shapes)

    code, resumed, out = run_worker(job_dir, timeout=600)
    assert code == jobfile.EXIT_OK, out
    assert training_starts(job_dir)[-1]["step"] == k and training_starts(job_dir)[-1]["resumed"]
    assert resumed.resumed_from == str(checkpoint)
    after = {s: loss for s, loss in _losses(job_dir).items() if s > k}
    assert sorted(after) == list(range(k + 1, 41))
    for s, loss in after.items():
        assert loss == pytest.approx(reference[s], rel=1e-4), (s, loss, reference[s])
    one = load_file(single / "adapter" / sharding.ADAPTER_WEIGHTS)
    two = load_file(job_dir / "adapter" / sharding.ADAPTER_WEIGHTS)
    gap = max((one[n] - two[n]).abs().max().item() for n in one)
    assert gap < 1e-4
    print(f"paused at step {k} of 40, resumed from {checkpoint.name}: adapters differ by at most {gap:.1e}")


@pytest.mark.timeout(900)
def test_fsdp2_rank_killed_ends_the_run_as_a_killed_worker_and_the_next_resumes(fsdp2_job, tiny_model_dir):
    """kill -9 of rank 1: the other rank is stopped, the wrapper ends by SIGKILL (the parent's
    "worker killed": paused, resumed), result.json names the rank; the next run resumes from the
    last complete checkpoint and saves the whole adapter."""
    import psutil

    job_dir = fsdp2_job(max_steps=40, save_steps=3)
    proc = _start(job_dir)
    _wait_for(proc, job_dir, lambda: bool(complete_checkpoints(job_dir)) and _step(job_dir) >= 4)
    [rank1] = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGKILL)
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, output(job_dir)
    result = jobfile.read_result(job_dir)
    assert result.status == "failed" and result.reason == "rank 1 was killed by signal 9 (SIGKILL)"
    assert not psutil.pid_exists(rank1.pid) or rank1.status() == psutil.STATUS_ZOMBIE
    last = complete_checkpoints(job_dir)[-1]
    assert int(last.name.split("-")[1]) % 3 == 0
    shapes = _whole_shapes(tiny_model_dir)
    for checkpoint in complete_checkpoints(job_dir):
        for name in (sharding.ADAPTER_WEIGHTS, sharding.FSDP_MODEL_FILE):
            sharding.check_adapter(checkpoint / name, shapes)

    code, resumed, out = run_worker(job_dir, timeout=600)
    assert code == jobfile.EXIT_OK, out
    start = training_starts(job_dir)[-1]
    assert start["resumed"] and f"step-{start['step']}" == last.name
    assert resumed.resumed_from == str(last) and resumed.steps == 40
    sharding.check_adapter(job_dir / "adapter" / sharding.ADAPTER_WEIGHTS, shapes)


@pytest.mark.timeout(900)
def test_fsdp2_adapter_saved_from_one_ranks_shard_fails_the_job_before_the_gate(fsdp2_job, tmp_path, monkeypatch):
    """The check before the one-process reload: were the gather to hand rank 0 its own shard (the
    accelerate #4206 save), the job fails naming the cut tensors, and no adapter/ reaches the gate."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_SLICE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    job_dir = fsdp2_job(max_steps=2, save_steps=1000)
    code, result, out = run_worker(job_dir, timeout=600)
    assert code == jobfile.EXIT_FAILED, out
    assert result.status == "failed" and result.reason.startswith("AdapterIncomplete: "), result.reason
    assert re.search(r"with a partial shape \(\S+\.lora_[AB]\.weight: \((\d+), (\d+)\), the model's is ", result.reason)
    assert result.adapter is None and not (job_dir / "adapter").exists()
