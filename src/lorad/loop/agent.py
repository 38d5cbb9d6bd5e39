"""One round of the generator's traffic, through atomicguard's own agent and generator.

Each task runs as its own workflow: atomicguard's ``DualStateAgent`` asks its
OpenAI-protocol generator (``OllamaGenerator``: the system message and temperature 0.7 it
always sends, the code extracted from the reply) for an answer, the task's tests judge it,
and a rejected attempt is retried with the guard's feedback in the prompt, ``rmax`` times.
Every attempt is stored by atomicguard's ``FilesystemArtifactDAG`` in the store lorad
watches, tagged with the version that answered (``metadata.adapter_version``: what lorad's
live check counts) and the task's family (``metadata.family``: what its held-out set
stratifies on).

With ``human_answers``, a task the generator never solved gets the answer a person wrote
(the task's ``solution``), stored after the rejected attempts as atomicguard's schema
records an amendment (``source: "human"``).

atomicguard is imported here only: install it with ``make loop`` (it declares Python 3.12
but runs on 3.11; ``--no-deps`` keeps its heavy optional dependencies out).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lorad.loop.tasks import Task, judge

ACTION_PAIR = "g_coder"
# The prompt template of the loop's action pair, as atomicguard's prompts.json holds one; lorad
# trains under it when [selection] prompt_template names it (prompt_format "atomicguard").
TEMPLATE = {
    "role": "You are a careful Python programmer.",
    "constraints": "Write one complete Python function that does what the task asks. Keep its name.",
    "task": "{specification}",
    "feedback_wrapper": "The guard rejected that attempt:\n{feedback}\nFix the function.",
}
# The ambient constraints every workflow runs under (the prompt's CONTEXT section).
CONSTRAINTS = "Python 3.11, standard library only."


def write_prompts(path: Path) -> Path:
    """The loop's prompts.json (one entry, ``g_coder``): ``selection.prompt_template = "FILE:g_coder"``."""
    Path(path).write_text(json.dumps({ACTION_PAIR: TEMPLATE}, indent=2) + "\n")
    return Path(path)


@dataclass(frozen=True)
class Attempted:
    """How one task went in a round."""

    task: str
    family: str
    attempts: int  # the generator's attempts
    accepted: bool  # by the generator, on one of its attempts
    human: bool = False  # a person's answer was stored after the generator gave up
    error: str = ""  # the round could not ask the server (not the generator's fault)

    @property
    def first_try(self) -> bool:
        return self.accepted and self.attempts == 1


def summary(results: list[Attempted]) -> dict:
    """Traffic figures of a round: first-try rate, accepted after retries, never, mean attempts."""
    asked = [r for r in results if not r.error]
    n = len(asked)
    first = sum(r.first_try for r in asked)
    later = sum(r.accepted and not r.first_try for r in asked)
    per_family: dict = {}
    for family in sorted({r.family for r in asked}):
        members = [r for r in asked if r.family == family]
        per_family[family] = {
            "tasks": len(members),
            "first_try": sum(r.first_try for r in members) / len(members),
            "never": sum(not r.accepted for r in members) / len(members),
        }
    return {
        "tasks": n,
        "errors": len(results) - n,
        "first_try": first / n if n else None,
        "after_retries": later / n if n else None,
        "never": (n - first - later) / n if n else None,
        "mean_attempts": sum(r.attempts for r in asked) / n if n else None,
        "human_answers": sum(r.human for r in asked),
        "per_family": per_family,
        "attempts_histogram": dict(sorted(Counter(r.attempts for r in asked).items())),
    }


def run_round(
    tasks: list[Task],
    *,
    store: Path,
    url: str,
    model: str,
    version: str,
    rmax: int = 3,
    workers: int = 8,
    human_answers: bool = False,
    timeout: float = 300.0,
) -> list[Attempted]:
    """Answer every task through atomicguard, ``workers`` at a time; each attempt lands in ``store``.

    Args:
        url: the server's base URL (its OpenAI API is under /v1).
        model: the served name to ask (``base``, or ``lorad-<version>`` once one is loaded).
        version: what the artifacts' ``metadata.adapter_version`` says answered them.
    """
    dag = _dag(store)

    def one(task: Task) -> Attempted:
        try:
            return _workflow(task, dag, url, model, version, rmax, human_answers, timeout)
        except Exception as e:  # noqa: BLE001 - a server error is the round's, reported, not fatal
            return Attempted(task.name, task.family, 0, False, error=f"{type(e).__name__}: {e}"[:300])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, tasks))


def _dag(store: Path):
    from atomicguard.infrastructure.persistence.filesystem import FilesystemArtifactDAG

    class Dag(FilesystemArtifactDAG):
        """atomicguard's DAG, also writing ``source`` (its schema has it; this class leaves it out)."""

        def _artifact_to_dict(self, artifact):
            return super()._artifact_to_dict(artifact) | {"source": artifact.source.value}

    return Dag(str(store))


def _workflow(
    task: Task, dag, url: str, model: str, version: str, rmax: int, human_answers: bool, timeout: float
) -> Attempted:
    from atomicguard.application.action_pair import ActionPair
    from atomicguard.application.agent import DualStateAgent
    from atomicguard.domain.exceptions import RmaxExhausted
    from atomicguard.domain.prompts import PromptTemplate

    workflow_id = str(uuid.uuid4())
    generator = _generator(url, model, timeout, {"adapter_version": version, "family": task.family, "task": task.name})
    agent = DualStateAgent(
        ActionPair(generator, _guard(task), PromptTemplate(**TEMPLATE)),
        dag,
        rmax=rmax,
        constraints=CONSTRAINTS,
        action_pair_id=ACTION_PAIR,
        workflow_id=workflow_id,
    )
    try:
        agent.execute(task.specification)
        return Attempted(task.name, task.family, generator.attempts, True)
    except RmaxExhausted:
        pass
    human = human_answers and bool(task.solution) and _store_human_answer(task, dag, workflow_id)
    return Attempted(task.name, task.family, generator.attempts, False, human=human)


def _generator(url: str, model: str, timeout: float, metadata: dict):
    from atomicguard.infrastructure.llm.ollama import OllamaGenerator, OllamaGeneratorConfig

    class Tagged(OllamaGenerator):
        """atomicguard's OpenAI-protocol generator, unchanged, plus the tags lorad reads."""

        attempts = 0

        def generate(self, *args, **kwargs):
            artifact = super().generate(*args, **kwargs)
            self.attempts += 1
            return dataclasses.replace(artifact, metadata=dict(artifact.metadata) | metadata)

    return Tagged(OllamaGeneratorConfig(model=model, base_url=url.rstrip("/") + "/v1", timeout=timeout))


def _guard(task: Task):
    from atomicguard.domain.interfaces import GuardInterface
    from atomicguard.domain.models import GuardResult

    class TestsGuard(GuardInterface):
        def validate(self, artifact, **dependencies):
            ok, feedback = judge(task, artifact.content)
            return GuardResult(passed=ok, feedback=feedback, guard_name="tests")

    return TestsGuard()


def _store_human_answer(task: Task, dag, workflow_id: str) -> bool:
    """A person's answer after the generator's last rejected attempt, as an amendment."""
    from atomicguard.domain.models import (
        Artifact,
        ArtifactId,
        ArtifactSource,
        ArtifactStatus,
        ContextSnapshot,
        FeedbackEntry,
        GuardResult,
    )

    ok, feedback = judge(task, task.solution)
    if not ok:
        return False
    tried = sorted(dag.get_by_workflow(workflow_id), key=lambda a: a.attempt_number)
    last = tried[-1] if tried else None
    history = tuple(
        FeedbackEntry(artifact_id=a.artifact_id, feedback=a.guard_result.feedback) for a in tried if a.guard_result
    )
    dag.store(
        Artifact(
            artifact_id=ArtifactId(str(uuid.uuid4())),
            workflow_id=workflow_id,
            content=task.solution,
            previous_attempt_id=last.artifact_id if last else None,
            parent_action_pair_id=None,
            action_pair_id=ACTION_PAIR,
            created_at=datetime.now().isoformat(),
            attempt_number=(last.attempt_number + 1) if last else 1,
            status=ArtifactStatus.ACCEPTED,
            guard_result=GuardResult(passed=True, feedback=feedback, guard_name="tests"),
            context=ContextSnapshot(
                workflow_id=workflow_id,
                specification=task.specification,
                constraints=CONSTRAINTS,
                feedback_history=history,
                dependency_artifacts=(),
            ),
            source=ArtifactSource.HUMAN,
            metadata={"family": task.family, "task": task.name},
        )
    )
    return True
