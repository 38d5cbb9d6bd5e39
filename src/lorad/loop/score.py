"""Greedy first attempts on unseen tasks, asked through the server as atomicguard asks.

The prompt is what atomicguard's generator sends on a first attempt (its system message, the
rendered prompt template), the answer is greedy, the code is extracted by atomicguard's own
extraction, and the task's tests judge it. First-attempt acceptance ε is the share accepted,
with its 95 % Wilson interval; two models are compared task by task with the exact McNemar
test the gate uses.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from lorad.evaluation.gate import mcnemar_p
from lorad.loop import agent, server
from lorad.loop.tasks import Task, judge

# What atomicguard's OpenAI-protocol generators (OllamaGenerator, HuggingFaceGenerator) send as
# the system message of every request; tests/loop checks it against the library's own request.
SYSTEM = (
    "You are a Python programming assistant. Provide complete, runnable code in a markdown block:\n"
    "```python\n# code\n```"
)


def first_attempt_messages(task: Task) -> list[dict]:
    """The messages of a first attempt at ``task``, rendered by atomicguard's PromptTemplate."""
    from atomicguard.domain.models import AmbientEnvironment, Context
    from atomicguard.domain.prompts import PromptTemplate

    context = Context(
        ambient=AmbientEnvironment(repository=None, constraints=agent.CONSTRAINTS), specification=task.specification
    )
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PromptTemplate(**agent.TEMPLATE).render(context)},
    ]


def extract(reply: str) -> str:
    """The code atomicguard's generator would store for ``reply``."""
    from atomicguard.infrastructure.llm.ollama import OllamaGenerator

    return OllamaGenerator._extract_code(None, reply)  # uses no instance state


def first_attempts(
    url: str, model: str, tasks: list[Task], *, workers: int = 8, max_tokens: int = server.MAX_NEW_TOKENS
) -> dict[str, dict]:
    """task name -> {"accepted", "feedback", "answer"}: one greedy first attempt each."""

    def one(task: Task) -> tuple[str, dict]:
        reply = server.chat(url, model, first_attempt_messages(task), max_tokens=max_tokens, temperature=0.0)
        ok, feedback = judge(task, extract(reply))
        return task.name, {"accepted": ok, "feedback": feedback[:200], "answer": reply[:400]}

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, tasks))


def any_pass(
    url: str,
    model: str,
    tasks: list[Task],
    *,
    n: int = 8,
    temperature: float = 1.0,
    max_tokens: int = server.MAX_NEW_TOKENS,
    workers: int = 4,
) -> dict[str, int]:
    """task name -> how many of ``n`` sampled first attempts pass: what GRPO with the guard as
    reward can learn from (a task none passes gives every sample the same reward: no signal)."""

    def one(task: Task) -> tuple[str, int]:
        replies = server.samples(
            url, model, first_attempt_messages(task), n=n, temperature=temperature, max_tokens=max_tokens
        )
        return task.name, sum(judge(task, extract(r))[0] for r in replies)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, tasks))


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95 % Wilson score interval of k successes in n trials."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(outcomes: dict[str, dict], names: list[str]) -> dict:
    """ε over ``names``: accepted, n, the share and its interval."""
    k = sum(bool(outcomes[n]["accepted"]) for n in names)
    lo, hi = wilson(k, len(names))
    return {"accepted": k, "n": len(names), "epsilon": k / len(names) if names else None, "ci95": [lo, hi]}


def rates(outcomes: dict[str, dict], tasks: list[Task]) -> dict:
    """ε over every task, and per family."""
    families: dict[str, list[str]] = {}
    for t in tasks:
        families.setdefault(t.family, []).append(t.name)
    return {
        "all": rate(outcomes, [t.name for t in tasks]),
        "per_family": {f: rate(outcomes, names) for f, names in sorted(families.items())},
    }


def paired(first: dict[str, dict], second: dict[str, dict]) -> dict:
    """The second model against the first on the tasks both answered: gained, lost, exact p."""
    shared = [k for k in first if k in second]
    gained = sum(second[k]["accepted"] and not first[k]["accepted"] for k in shared)
    lost = sum(first[k]["accepted"] and not second[k]["accepted"] for k in shared)
    return {"tasks": len(shared), "gained": gained, "lost": lost, "p": mcnemar_p(gained, lost)}
