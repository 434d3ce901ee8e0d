"""What the sweep's driver needs from a backend: start workers, watch them, stop them.

A backend turns :class:`~eprun.sweep.worker.Task` objects (one attempt at one point each) into
:class:`Attempt` objects the driver polls. The driver alone writes sweep.json; a backend never
touches it. Implementations: :mod:`eprun.sweep.local` (processes on this machine) and
:mod:`eprun.sweep.slurm` (jobs submitted through submitit).
"""

from __future__ import annotations

from typing import Any, Protocol

from eprun.sweep.worker import Outcome, Task


class Attempt(Protocol):
    """One started (or queued) worker."""

    task: Task

    @property
    def handle(self) -> str:
        """What sweep.json records to find the worker again: ``pid N`` or ``slurm job N``."""

    def started(self) -> bool:
        """Whether the worker runs (False while it waits in a queue)."""

    def poll(self) -> Outcome | None:
        """None while the worker runs or waits; its outcome once it has ended. Never raises for a
        failed worker: a failure is an outcome."""

    def stop(self, signum: int) -> None:
        """Ask the worker to stop cleanly: its run checkpoints and ends ``interrupted``. Called
        again, a local worker stops at once (from its last checkpoint)."""


class Backend(Protocol):
    """Where the workers run."""

    #: how many workers the driver keeps started at once
    slots: int
    #: True when :meth:`launch` only queues the workers (their points read ``submitted`` until they start)
    queues: bool

    def threads(self) -> int | None:
        """torch threads per worker (``--threads``), or None for torch's default."""

    def launch(self, tasks: list[Task]) -> list[Attempt]:
        """Start (or submit) one worker per task, in order; one attempt per task."""

    def describe(self) -> dict[str, Any]:
        """The settings sweep.json records (a resumed sweep starts from them)."""
