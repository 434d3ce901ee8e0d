"""The local backend: N points at once, each an ``eprun train`` process on this machine.

The cores this process may use are shared out: each worker gets ``--threads max(1, cores // N)``.
Workers start in their own session, so a Ctrl-C at the terminal reaches the sweep alone; the
sweep then forwards one stop request to each worker (two would stop it at once, without the
checkpoint it writes at the next batch boundary).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from eprun.sweep import worker
from eprun.sweep.worker import Outcome, Task


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass
class LocalAttempt:
    task: Task
    process: subprocess.Popen
    stderr_offset: int
    stopped_with: list[int] = field(default_factory=list)

    @property
    def handle(self) -> str:
        return f"pid {self.process.pid}"

    def started(self) -> bool:
        return True

    def poll(self) -> Outcome | None:
        code = self.process.poll()
        return None if code is None else worker.outcome_of(self.task, code, self.stderr_offset)

    def stop(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            self.stopped_with.append(signum)


class LocalBackend:
    """``jobs`` workers at once on this machine's ``cores`` (default: those this process may use)."""

    queues = False

    def __init__(self, jobs: int, cores: int | None = None):
        self.slots = jobs
        self.cores = cores or available_cores()

    def threads(self) -> int:
        return max(1, self.cores // self.slots)

    def launch(self, tasks: list[Task]) -> list[LocalAttempt]:
        attempts = []
        for task in tasks:
            process, offset = worker.start(task, new_session=True)
            attempts.append(LocalAttempt(task, process, offset))
        return attempts

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "jobs": self.slots, "threads_per_worker": self.threads()}
