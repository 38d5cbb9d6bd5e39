"""Write AtomicGuard-format artifact stores: for the demo, the benchmarks and the tests.

The files are laid out exactly as atomicguard's FilesystemArtifactDAG writes them
(objects/<first two chars>/<artifact_id>.json, indent=2, plus index.json), so what lorad
reads from these is what it reads from a real store.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any


def artifact(
    *,
    workflow_id: str,
    content: str,
    status: str,
    attempt_number: int = 1,
    previous_attempt_id: str | None = None,
    specification: str = "Write a function.",
    constraints: str = "Return only Python code.",
    feedback: str = "",
    feedback_history: Iterable[tuple[str, str]] = (),
    action_pair_id: str = "g_coder",
    created_at: datetime | None = None,
    artifact_id: str | None = None,
    source: str | None = None,
    metadata: dict | None = None,
) -> dict:
    """One artifact as atomicguard serialises it (guard_result present unless pending)."""
    created_at = created_at or datetime.now(timezone.utc)
    obj: dict[str, Any] = {
        "artifact_id": artifact_id or str(uuid.uuid4()),
        "workflow_id": workflow_id,
        "content": content,
        "previous_attempt_id": previous_attempt_id,
        "parent_action_pair_id": None,
        "action_pair_id": action_pair_id,
        "created_at": created_at.replace(tzinfo=None).isoformat(),
        "attempt_number": attempt_number,
        "status": status,
        "guard_result": None
        if status == "pending"
        else {
            "passed": status == "accepted",
            "feedback": feedback or ("All tests passed" if status == "accepted" else ""),
            "fatal": False,
            "guard_name": "TestGuard",
            "metadata": None,
            "sub_results": [],
        },
        "context": {
            "workflow_id": workflow_id,
            "specification": specification,
            "constraints": constraints,
            "feedback_history": [{"artifact_id": a, "feedback": f} for a, f in feedback_history],
            "dependency_artifacts": {},
            "escalation_feedback": [],
            "dependency_types": {},
        },
    }
    if source is not None:
        obj["source"] = source
    if metadata is not None:
        obj["metadata"] = metadata
    return obj


def object_path(root: Path, artifact_id: str) -> Path:
    return Path(root) / "objects" / artifact_id[:2] / f"{artifact_id}.json"


def write(root: Path, obj: dict, *, atomic: bool = True) -> Path:
    """Write one artifact file (via a temp file and rename unless ``atomic`` is False)."""
    path = object_path(root, obj["artifact_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj, indent=2)
    if atomic:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(data)
        os.replace(tmp, path)
    else:
        path.write_text(data)
    return path


def write_index(root: Path, artifacts: Iterable[dict]) -> None:
    index: dict[str, Any] = {"version": "1.0", "artifacts": {}, "action_pairs": {}}
    for a in artifacts:
        index["artifacts"][a["artifact_id"]] = {
            "path": str(object_path(Path("."), a["artifact_id"])),
            "workflow_id": a["workflow_id"],
            "action_pair_id": a["action_pair_id"],
            "parent_action_pair_id": None,
            "status": a["status"],
            "created_at": a["created_at"],
        }
        index["action_pairs"].setdefault(a["action_pair_id"], []).append(a["artifact_id"])
    tmp = Path(root) / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, Path(root) / "index.json")


def chain(
    *,
    workflow_id: str | None = None,
    specification: str,
    attempts: list[tuple[str, str, str]],
    start: datetime | None = None,
    constraints: str = "Return only Python code.",
    action_pair_id: str = "g_coder",
    metadata: dict | None = None,
    rng: random.Random | None = None,
) -> list[dict]:
    """A retry chain: ``attempts`` is [(content, status, feedback), ...] in order.

    Each attempt links to the one before through previous_attempt_id and carries the
    feedback history of the rejected attempts before it, as atomicguard records them.
    With ``rng`` the workflow and artifact ids come from it (a store written twice with the
    same seed is the same store, files and their order included); else they are random.
    """
    new_id = (lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))) if rng else (lambda: str(uuid.uuid4()))
    workflow_id = workflow_id or new_id()
    start = start or datetime.now(timezone.utc)
    out: list[dict] = []
    history: list[tuple[str, str]] = []
    for i, (content, status, feedback) in enumerate(attempts):
        a = artifact(
            workflow_id=workflow_id,
            content=content,
            status=status,
            attempt_number=i + 1,
            previous_attempt_id=out[-1]["artifact_id"] if out else None,
            specification=specification,
            constraints=constraints,
            feedback=feedback,
            feedback_history=list(history),
            action_pair_id=action_pair_id,
            created_at=start + timedelta(milliseconds=20 * i),
            metadata=metadata,
            artifact_id=new_id(),
        )
        out.append(a)
        if status == "rejected":
            history.append((a["artifact_id"], feedback))
    return out
