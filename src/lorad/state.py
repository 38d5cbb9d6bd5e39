"""The state directory's layout (``daemon.state_dir``; /var/lib/lorad under systemd): every path
lorad keeps there, named once.

::

    buffer.sqlite3              the replay buffer (unless buffer.path puts it elsewhere)
    adapters/                   the registry: vNNNN-... versions, current and previous, pointers.jsonl
    jobs/<job_id>/              one job's directory (lorad.training.jobdir)
    base/<hash>/                base models converted from GGUF files
    training.lock               held by the cycle that trains (lorad.cycle.lock)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def buffer(self) -> Path:
        return self.root / "buffer.sqlite3"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def job(self, job_id: str) -> Path:
        return self.jobs / job_id

    @property
    def base_models(self) -> Path:
        return self.root / "base"

    @property
    def training_lock(self) -> Path:
        return self.root / "training.lock"
