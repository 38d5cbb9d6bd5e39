"""GRPO with the guard as the reward: the worker end to end on the tiny model, and its parts."""

from __future__ import annotations

import signal
import stat
import time

import pytest
from training_helpers import FSDP2_CONFIG, output, run_worker, start_worker, training_starts

from lorad.evaluation.metrics import closes_first_block
from lorad.training import jobdir as jobfile
from lorad.training.checkpoints import complete_checkpoints
from lorad.training.grpo import GuardReward

# The tiny model samples from a 512-token BPE vocabulary; about one completion in eight
# starts with one of these letters, so groups of 8 nearly always hold both verdicts.
ACCEPTED_START = "aeiou"
HEAD_SCALE = 10.0


@pytest.fixture
def guard(tmp_path):
    """A guard accepting any artifact that starts with a vowel (a shell script: quick to spawn)."""
    path = tmp_path / "vowel_guard.sh"
    path.write_text(
        '#!/bin/sh\nIFS= read -r line\ncase "$line" in [' + ACCEPTED_START + "]*) exit 0;; esac\n"
        'echo "does not start with a vowel"\nexit 1\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return (str(path),)


def prompt_row(i: int) -> dict:
    spec = f"Say a word, {i}."
    return {"prompt": [{"role": "user", "content": spec}], "specification": spec, "metadata": {"chain_id": f"c{i}"}}


@pytest.fixture(scope="module")
def grpo_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output head scaled up.

    Why: at the usual init (std 0.02) the head maps every hidden state to nearly uniform
    logits, so no LoRA on the inner layers could move the next-token distribution within a
    test's few steps; a real model's head is not like that.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    out = tmp_path_factory.mktemp("grpo") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture
def make_grpo_job(make_job, guard, grpo_model_dir):
    def make(**overrides):
        job_dir = make_job(
            **{
                "method": "grpo",
                "base_model": str(grpo_model_dir),
                "guard_command": guard,
                "batch_size": 8,
                "num_generations": 8,
                "max_completion_length": 2,
                "learning_rate": 1e-2,
                "max_steps": 40,
                "save_steps": 100,
                "temperature": 1.0,
                "seed": 1,
                **overrides,
            }
        )
        jobfile.write_jsonl(job_dir / jobfile.PROMPTS_FILE, [prompt_row(i) for i in range(8)])
        return job_dir

    return make


def _rewards(job_dir) -> dict[int, float]:
    return {
        r["step"]: r["reward"] for r, _ in jobfile.iter_progress(job_dir) if r["stage"] == "training" and "reward" in r
    }


def _pause_after_rewarded_steps(job_dir, steps: int) -> jobfile.Result:
    """Start the worker, SIGTERM it once ``steps`` GRPO steps have logged a reward; its result."""
    proc = start_worker(job_dir)
    deadline = time.monotonic() + 180
    while len(_rewards(job_dir)) < steps:
        assert proc.poll() is None, output(job_dir)
        assert time.monotonic() < deadline, f"GRPO did not reach step {steps}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == jobfile.EXIT_PAUSED, output(job_dir)
    return jobfile.read_result(job_dir)


def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def test_grpo_reward_rises_and_the_adapter_changes(make_grpo_job):
    job_dir = make_grpo_job()
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    rewards = _rewards(job_dir)
    assert sorted(rewards) == list(range(1, 41))
    first, last = [rewards[s] for s in range(1, 9)], [rewards[s] for s in range(33, 41)]
    assert sum(last) / 8 > sum(first) / 8 + 0.25, rewards
    weights = _adapter_weights(job_dir / "adapter")
    # A fresh LoRA's B matrices start at zero: any non-zero one was learned.
    assert any(float(w.abs().sum()) > 0 for k, w in weights.items() if "lora_B" in k)
    assert not any(".ref." in k for k in weights), "GRPO's reference adapter was saved"
    assert result.method == "grpo" and result.health["ok"]


def test_grpo_resume_after_sigterm_continues_from_the_checkpoint(make_grpo_job):
    job_dir = make_grpo_job(max_steps=12)
    paused = _pause_after_rewarded_steps(job_dir, 3)
    stopped_at = paused.steps
    assert paused.status == "paused" and 3 <= stopped_at < 12
    assert [p.name for p in complete_checkpoints(job_dir)] == [f"step-{stopped_at}"]

    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert result.steps == 12 and result.resumed_from.endswith(f"step-{stopped_at}")
    starts = [(r["step"], r["resumed"]) for r in training_starts(job_dir)]
    assert starts == [(0, False), (stopped_at, True)]
    assert sorted(_rewards(job_dir)) == list(range(1, 13))


def test_grpo_without_a_guard_fails_before_training(make_grpo_job):
    job_dir = make_grpo_job(guard_command=())
    code, result, _ = run_worker(job_dir)
    assert code == jobfile.EXIT_FAILED
    assert "guard command" in result.error and result.steps == 0


def test_guard_reward_scores_each_completion_by_the_guard_exit_code(guard):
    reward = GuardReward(guard, timeout=10)
    completions = [
        [{"role": "assistant", "content": "apple"}],
        [{"role": "assistant", "content": "pear"}],
        [{"role": "assistant", "content": "```python\nok = 1\n```\nprose"}],
    ]
    assert reward(prompts=[None] * 3, completions=completions, specification=["s"] * 3) == [1.0, 0.0, 1.0]


def test_guard_reward_passes_the_specification_and_scores_a_timeout_zero(tmp_path):
    script = tmp_path / "g.sh"
    script.write_text('#!/bin/sh\n[ "$LORAD_SPECIFICATION" = slow ] && sleep 5\n[ "$LORAD_SPECIFICATION" = yes ]\n')
    script.chmod(0o755)
    reward = GuardReward((str(script),), timeout=0.5)
    done = [{"role": "assistant", "content": "x"}]
    assert reward(prompts=[None] * 3, completions=[done] * 3, specification=["yes", "no", "slow"]) == [1.0, 0.0, 0.0]


def test_first_block_closes_only_at_its_closing_fence():
    assert not closes_first_block("Here:\n```python\ndef f():\n    return 1\n")
    assert closes_first_block("Here:\n```python\ndef f():\n    return 1\n```")
    assert not closes_first_block("no code at all")


def test_generation_stops_after_the_first_code_block(tiny_model_dir):
    """Whatever the model would write next, the completion ends right after the closing fence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorad.training.grpo import stop_after_first_block

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompt = tok("Write x.", return_tensors="pt")["input_ids"]
    script = tok("```python\nx = 1\n```", add_special_tokens=False)["input_ids"]
    after = tok("a", add_special_tokens=False)["input_ids"][0]

    class Script:
        """Forces the scripted tokens, then "a" forever (prose after the code)."""

        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - prompt.shape[1]
            forced = script[step] if step < len(script) else after
            out = torch.full_like(scores, -1e9)
            out[:, forced] = 0.0
            return out

    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=len(script) + 5,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    free = model.generate(input_ids=prompt, logits_processor=[Script()], **kwargs)[0, prompt.shape[1] :].tolist()
    assert free == script + [after] * 5  # without the stop the prose runs to the cap
    with stop_after_first_block(model, tok):
        out = model.generate(input_ids=prompt, logits_processor=[Script()], **kwargs)[0, prompt.shape[1] :].tolist()
    assert out == script + [tok.eos_token_id], tok.decode(out)
    assert "generate" not in vars(model), "the wrapper outlived its context"


# -- SFT then GRPO in one job ("sft+grpo") ------------------------------------------------------


def _phase_starts(job_dir) -> list[tuple[str, int, bool]]:
    """(phase, step, resumed) of each phase start the worker recorded."""
    return [(r["phase"], r["step"], r["resumed"]) for r in training_starts(job_dir)]


def test_sft_then_grpo_trains_both_phases_in_one_job_and_grpo_starts_from_the_sft_adapter(make_grpo_job):
    import torch

    # GRPO at a rate too small to move the weights visibly: the result is the SFT phase's adapter
    # (a GRPO phase starting from a fresh LoRA would end with its B matrices near zero)
    job_dir = make_grpo_job(method="sft+grpo", max_steps=3, grpo_steps=4, grpo_learning_rate=1e-7)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert [(p["method"], p["steps"]) for p in result.phases] == [("sft", 3), ("grpo", 4)]
    assert result.method == "sft+grpo" and result.steps == 7 and result.total_steps == 7
    assert _phase_starts(job_dir) == [("sft", 0, False), ("grpo", 0, False)]
    peak = {}
    for r, _ in jobfile.iter_progress(job_dir):
        if r.get("loss") is not None:
            peak[r["phase"]] = max(peak.get(r["phase"], 0.0), r["learning_rate"])
    assert peak["grpo"] <= 1e-7 and 5e-3 < peak["sft"] <= 1e-2  # each phase on its own rate (linear decay)
    assert sorted(_rewards(job_dir)) == [1, 2, 3, 4]  # the reward is GRPO's alone
    sft = _adapter_weights(job_dir / "checkpoints" / "sft" / "adapter")
    final = _adapter_weights(job_dir / "adapter")
    assert sft.keys() == final.keys()
    lora_b = [w for k, w in sft.items() if "lora_B" in k]
    assert lora_b  # else the checks below hold of nothing
    assert all(float(w.abs().max()) > 1e-3 for w in lora_b)  # SFT learned
    assert all(torch.allclose(final[k], w, atol=1e-5) for k, w in sft.items())  # GRPO began there
    assert result.health["ok"]


def test_sft_then_grpo_paused_in_grpo_resumes_there_without_training_sft_again(make_grpo_job):
    job_dir = make_grpo_job(method="sft+grpo", max_steps=3, grpo_steps=10, save_steps=100)
    paused = _pause_after_rewarded_steps(job_dir, 2)
    stopped_at = paused.phases[-1]["steps"]
    assert paused.status == "paused" and [p["method"] for p in paused.phases] == ["sft", "grpo"]
    assert [p.name for p in complete_checkpoints(job_dir, "grpo")] == [f"step-{stopped_at}"]
    assert complete_checkpoints(job_dir, "sft") == []  # done: its adapter is what the job keeps

    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert result.phases[0] == paused.phases[0]  # the SFT phase as the first run recorded it
    assert result.phases[1]["resumed_from"].endswith(f"grpo/step-{stopped_at}")
    assert result.steps == 13
    assert _phase_starts(job_dir) == [("sft", 0, False), ("grpo", 0, False), ("grpo", stopped_at, True)]


def test_sft_then_grpo_killed_after_the_sft_phase_resumes_at_grpo_from_the_kept_adapter(make_grpo_job):
    """SIGKILL (no checkpoint, no result) once the SFT phase's adapter is kept: the next run
    trains GRPO only, from that adapter, and records the SFT phase as it ended."""
    job_dir = make_grpo_job(method="sft+grpo", max_steps=3, grpo_steps=3, save_steps=100)
    kept = job_dir / "checkpoints" / "sft" / "adapter"
    proc = start_worker(job_dir)
    deadline = time.monotonic() + 180
    while not (kept / "lorad-phase.json").is_file():
        assert proc.poll() is None, output(job_dir)
        assert time.monotonic() < deadline, "the SFT phase did not finish"
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=60)
    sft_weights = _adapter_weights(kept)

    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert [(p["method"], p["steps"]) for p in result.phases] == [("sft", 3), ("grpo", 3)]
    assert [s for s in _phase_starts(job_dir) if s[0] == "sft"] == [("sft", 0, False)]  # SFT ran once
    assert _adapter_weights(kept).keys() == sft_weights.keys()
    assert not list(kept.parent.glob(".adapter.*"))  # no half-written phase adapter left behind


def test_sft_then_grpo_runs_under_two_processes(make_grpo_job):
    """DDP (gloo): rank 0 keeps the SFT phase's adapter, every rank starts GRPO from it."""
    job_dir = make_grpo_job(method="sft+grpo", max_steps=2, grpo_steps=2, processes=2)
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert result.processes == 2 and [(p["method"], p["steps"]) for p in result.phases] == [("sft", 2), ("grpo", 2)]
    assert sorted(_rewards(job_dir)) == [1, 2]  # rank 0 alone writes progress


@pytest.mark.timeout(900)
def test_sft_then_grpo_runs_under_two_fsdp2_ranks_with_the_sft_adapter_whole(make_grpo_job, tmp_path):
    """FSDP2: the SFT phase's adapter is gathered from both ranks' shards before GRPO starts from it."""
    from lorad.training import sharding

    config = tmp_path / "fsdp2.yaml"
    config.write_text(FSDP2_CONFIG)
    job_dir = make_grpo_job(method="sft+grpo", max_steps=2, grpo_steps=2, processes=2, accelerate_config=str(config))
    code, result, out = run_worker(job_dir, timeout=600)
    assert code == jobfile.EXIT_OK, out[-3000:]
    assert [(p["method"], p["steps"]) for p in result.phases] == [("sft", 2), ("grpo", 2)]
    sft = _adapter_weights(job_dir / "checkpoints" / "sft" / "adapter")
    final = _adapter_weights(job_dir / "adapter")
    assert {k: v.shape for k, v in sft.items()} == {k: v.shape for k, v in final.items()}
    expected = {k: tuple(v.shape) for k, v in final.items()}
    sharding.check_adapter(job_dir / "checkpoints" / "sft" / "adapter" / sharding.ADAPTER_WEIGHTS, expected)
    assert all(v.shape[0] == 4 for k, v in sft.items() if "lora_A" in k)  # r = 4 rows: not one rank's 2


def test_sft_then_grpo_offers_the_sft_phase_adapter_when_grpo_gains_no_held_out_task(make_grpo_job):
    """GRPO at a rate that cannot change an answer: no task gained, so adapter/ is the SFT
    phase's (byte for byte), scored and health-checked as the candidate."""
    job_dir = make_grpo_job(
        method="sft+grpo", max_steps=3, grpo_steps=2, grpo_learning_rate=1e-7, evaluate=True, max_new_tokens=2
    )
    code, result, out = run_worker(job_dir)
    assert code == jobfile.EXIT_OK, out[-3000:]
    grpo = result.phases[-1]
    assert grpo["kept"] is False and "(0 gained, 0 lost): no gain, so the SFT phase's adapter" in grpo["decision"]
    kept = job_dir / "checkpoints" / "sft" / "adapter" / "adapter_model.safetensors"
    assert (job_dir / "adapter" / "adapter_model.safetensors").read_bytes() == kept.read_bytes()
    assert set(result.metrics) == {"candidate", "active"} and "epsilon" in result.metrics["candidate"]
    assert result.health["ok"] and result.adapter == str(job_dir / "adapter")
