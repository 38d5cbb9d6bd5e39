"""The training worker failing three ways under the running daemon: an exception (a base model
whose config.json is corrupt), a NaN loss (a base model with NaN weights) and a CUDA
out-of-memory error (raised from backward() by a sitecustomize the worker loads; the only
simulated fault here, as this machine has no GPU).

Each time: the job fails with the reason, the scheduler backs off (1x, 2x, 4x the initial
delay) before the next window job, and the adapter serving stays exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from daemon_helpers import WORKER_ENV, training_sections

BACKOFF = 3.0  # seconds: schedule.backoff_initial

SITECUSTOMIZE = """
import os, sys
trigger = os.environ.get("LORAD_FAULT_OOM_TRIGGER")
if trigger and os.path.exists(trigger) and "lorad.training.worker" in sys.orig_argv:
    import torch

    def backward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                     "(GPU 0; 7.79 GiB total capacity; simulated by the fault suite)")

    torch.Tensor.backward = backward
"""


def served_version(state: Path, model: Path) -> str:
    """An adapter promoted by hand before the daemon starts: what must keep serving."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorad.release.registry import Registry

    torch.set_num_threads(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    adapter = state.parent / "hand-adapter"
    peft_model.save_pretrained(adapter)
    registry = Registry(state / "adapters", keep=5, keep_best=True)
    version = registry.create(adapter, {"base_model": str(model), "job_id": None, "verdict": {"promote": True}})
    registry.promote(version.name, reason="served before the fault test")
    return version.name


def broken_models(root: Path, model: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corrupt = root / "corrupt-model"
    shutil.copytree(model, corrupt)
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    nan = root / "nan-model"
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.norm.weight.fill_(float("nan"))
    m.save_pretrained(nan)
    AutoTokenizer.from_pretrained(model).save_pretrained(nan)
    return corrupt, nan


def failed_jobs(d) -> list[dict]:
    return [j for j in d.request("jobs", limit=50)["jobs"] if j["state"] == "failed"]


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_worker_exception_nan_and_oom_fail_the_job_with_reason_back_off_and_leave_serving_untouched(
    daemon_factory, short_root, tiny_model
):
    state = short_root / "state"
    before = served_version(state, tiny_model)
    current = state / "adapters" / "current"
    corrupt, nan = broken_models(short_root, tiny_model)
    hooks = short_root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    trigger = short_root / "oom-now"

    sections = training_sections(
        corrupt, max_steps=4, save_steps=2, min_new_examples=1, backoff_initial=BACKOFF, backoff_max=60.0
    )
    sections["training"]["warm_start"] = False
    env = dict(WORKER_ENV, PYTHONPATH=str(hooks), LORAD_FAULT_OOM_TRIGGER=str(trigger))
    d = daemon_factory(env=env, **sections)
    text = d.config.read_text()

    plan = [  # (what the next job meets, the reason it must fail with)
        ("corrupt config.json", str(corrupt), None),
        ("NaN weights", str(nan), "loss became nan at step 1"),
        ("CUDA out of memory", str(tiny_model), "CUDA out of memory"),
    ]
    seen: list[dict] = []
    for n, (what, model, reason) in enumerate(plan, start=1):
        if n > 1:
            # Set up the next fault while the daemon backs off (it waits BACKOFF * 2**(n-2) s).
            d.config.write_text(text.replace(f'"{corrupt}"', json.dumps(model)))
            if what == "CUDA out of memory":
                trigger.touch()
            assert d.request("reload")["ok"], d.log_text()[-2000:]
        job = d.wait_for(
            lambda: (f := failed_jobs(d)) and len(f) >= n and f[0],  # noqa: B023 - wait_for calls it now
            timeout=240,
            what=f"job {n} ({what}) to fail",
        )
        assert job["job_id"] not in {j["job_id"] for j in seen}
        if reason:
            assert reason in job["reason"], (what, job["reason"])
        else:
            assert "config" in job["reason"].lower() or "json" in job["reason"].lower(), job["reason"]
        assert not job["reason"].startswith("worker exited with code"), job["reason"]  # the worker said why
        status = d.wait_for(
            lambda: (st := d.request("status"))["schedule"]["failures"] == n and st,  # noqa: B023 - called now
            timeout=10,
            what=f"the failure count to reach {n}",
        )
        assert status["ok"] and status["active_version"] == before
        assert status["schedule"]["backoff_until"] >= job["finished_at"] + BACKOFF * 2 ** (n - 1) - 1
        assert os.readlink(current) == before
        if seen:  # the job did not start before the back-off after the previous failure ended
            waited = job["created_at"] - seen[-1]["finished_at"]
            assert waited >= BACKOFF * 2 ** (n - 2) - 0.5, (n, waited)
        seen.append(job)

    assert d.cli("pause").returncode == 0  # no more window jobs
    ev = [e for e in d.events() if e.get("event") == "backoff_started" and "backoff_s" in e]
    assert [e["backoff_s"] for e in ev[:3]] == [BACKOFF, 2 * BACKOFF, 4 * BACKOFF]
    assert d.request("status")["schedule"]["backoff_until"] > time.time() - 60

    from lorad.release.registry import Registry

    registry = Registry(state / "adapters", keep=5, keep_best=True)
    assert registry.current() == before and registry.verify(before) == []
    assert [v.name for v in registry.versions()] == [before]  # no failed job made a version
