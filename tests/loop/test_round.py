"""The loop's parts together, with the tiny model: atomicguard's agent answers a round through a
scripted OpenAI server, the store grows, the daemon's scheduler runs a cycle, its vllm hook tells
the server to load the promoted version, and the next round is answered by that version."""

from __future__ import annotations

import json
import re
import sys

import pytest

from fake_http import FakeServer, JsonHandler
from lorad.loop import agent
from lorad.loop.daemon import Daemon
from lorad.loop.tasks import Task, write_tasks

pytest.importorskip("atomicguard", reason="the loop's generator side: `make loop` installs atomicguard")


def add_task(k: int) -> Task:
    return Task(
        f"add_{k}",
        "add",
        f"Write a Python function `add_{k}(x)` that returns x plus {k}.",
        f"add_{k}",
        tests=(f"add_{k}(0) == {k}", f"add_{k}(10) == {10 + k}"),
        solution=f"def add_{k}(x):\n    return x + {k}\n",
    )


class ScriptedServer(FakeServer):
    """An OpenAI-protocol server with a script for answers: the base model gets each task wrong
    until the guard's feedback is in the prompt, a loaded adapter gets it right at once. It speaks
    vLLM's runtime LoRA endpoints, so lorad's vllm hook loads versions into it."""

    def __init__(self, tasks: list[Task]):
        self.loaded: dict[str, str] = {}
        self.asked: list[str] = []  # the model of each chat request
        fake = self

        class Handler(JsonHandler):
            def do_GET(self):
                if self.path == "/v1/models":
                    return self.reply(200, {"data": [{"id": m} for m in ["base", *fake.loaded]]})
                return self.reply(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.read_body())
                if self.path == "/v1/load_lora_adapter":
                    fake.loaded[body["lora_name"]] = body["lora_path"]
                    return self.reply(200, "Success")
                if self.path == "/v1/unload_lora_adapter":
                    fake.loaded.pop(body["lora_name"], None)
                    return self.reply(200, "Success")
                model, prompt = body["model"], body["messages"][-1]["content"]
                if model != "base" and model not in fake.loaded:
                    return self.reply(404, {"error": {"message": f"The model `{model}` does not exist."}})
                fake.asked.append(model)
                task = next(t for t in tasks if t.specification in prompt)
                right = model != "base" or "# RETRY HISTORY" in prompt
                code = task.solution if right else f"def {task.entry_point}(x):\n    return x\n"
                return self.reply(
                    200,
                    {
                        "id": "c",
                        "object": "chat.completion",
                        "created": 0,
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": f"```python\n{code}```\nDone."},
                            }
                        ],
                    },
                )

        super().__init__(Handler)


def config_text(tmp_path, model_dir, url) -> str:
    guard = [sys.executable, "-m", "lorad.loop.tasks", "--guard", str(tmp_path / "tasks.json")]
    return f"""
[daemon]
state_dir = "{tmp_path / "state"}"
socket = "{tmp_path / "lorad.sock"}"
[[store.sources]]
kind = "atomicguard"
path = "{tmp_path / "store"}"
[store]
settle_seconds = 0.2
[selection]
prompt_template = "{tmp_path / "prompts.json"}:{agent.ACTION_PAIR}"
prompt_format = "atomicguard"
family_key = "family"
heldout_min_tasks = 4
[schedule]
windows = ["00:00-23:59"]
min_new_examples = 2
reconcile_interval = 5.0
[training]
base_model = "{model_dir}"
max_steps = 30
batch_size = 4
learning_rate = 0.01
lora_r = 8
lora_alpha = 64
lora_dropout = 0.0
max_seq_length = 256
quantization = "none"
gradient_checkpointing = false
save_steps = 1000
[evaluation]
guard_command = {json.dumps(guard)}
max_new_tokens = 16
min_heldout_examples = 3
[[publish]]
kind = "vllm"
url = "{url}"
timeout = 10.0
retries = 0
[logging]
format = "json"
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from lorad.training.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, vocab_size=512)


def test_a_round_fills_the_store_a_cycle_promotes_and_the_server_serves_the_new_version(tmp_path, tiny_dir):
    first, second = [add_task(k) for k in range(2, 14)], [add_task(k) for k in range(20, 26)]
    write_tasks(tmp_path / "tasks.json", first + second)
    agent.write_prompts(tmp_path / "prompts.json")
    with ScriptedServer(first + second) as server:
        config = tmp_path / "config.toml"
        config.write_text(config_text(tmp_path, tiny_dir, server.url))
        daemon = Daemon(tmp_path, config, tmp_path / "lorad.sock")
        daemon.start()
        try:
            daemon.request("pause")
            done = agent.run_round(
                first, store=tmp_path / "store", url=server.url, model="base", version="base", workers=4
            )
            traffic = agent.summary(done)
            assert traffic["errors"] == 0 and traffic["first_try"] == 0.0 and traffic["mean_attempts"] == 2.0
            stored = [json.loads(p.read_text()) for p in (tmp_path / "store" / "objects").rglob("*.json")]
            assert len(stored) == 24 and {a["metadata"]["adapter_version"] for a in stored} == {"base"}
            assert all(a["metadata"]["family"] == "add" for a in stored)

            job = daemon.cycle(tmp_path / "store", timeout=600)
            assert job["state"] == "promoted", job
            version = daemon.active_version()
            assert version == job["version"] and f"lorad-{version}" in server.loaded
            assert server.loaded[f"lorad-{version}"].endswith(version)

            done = agent.run_round(
                second, store=tmp_path / "store", url=server.url, model=f"lorad-{version}", version=version, workers=4
            )
            assert agent.summary(done)["first_try"] == 1.0
            assert set(server.asked[-len(second) :]) == {f"lorad-{version}"}
            # The daemon sees the new version's traffic: lorad history shows it live.
            daemon.wait_for(lambda s: s["buffer"]["artifacts"] >= 30, 60, "the second round")
        finally:
            assert daemon.stop() == 0
    from lorad import config as cfg
    from lorad.evaluation.live import live_rates

    live = live_rates(cfg.load(config), [version])[version]
    assert (live.accepted, live.attempts, live.mean_attempts) == (6, 6, 1.0)


def test_a_human_answer_after_the_generator_gives_up_is_stored_as_atomicguard_records_an_amendment(tmp_path):
    task = add_task(7)
    with ScriptedServer([task]) as server:
        done = agent.run_round(
            [task], store=tmp_path / "store", url=server.url, model="base", version="base", rmax=0, human_answers=True
        )
    assert done[0].human and not done[0].accepted and done[0].attempts == 1
    stored = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "store" / "objects").rglob("*.json")),
        key=lambda a: a["attempt_number"],
    )
    assert [(a["source"], a["status"]) for a in stored] == [("generated", "rejected"), ("human", "accepted")]
    assert stored[1]["previous_attempt_id"] == stored[0]["artifact_id"]
    assert re.search(r"return x \+ 7", stored[1]["content"])
    assert stored[1]["context"]["feedback_history"][0]["artifact_id"] == stored[0]["artifact_id"]
