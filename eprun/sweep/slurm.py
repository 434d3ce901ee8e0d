"""The Slurm backend: each point a job submitted through submitit, all points as one job array.

Each job runs a :class:`PointJob`: the point's ``eprun train`` as a child process on the node,
its output in the point's folder (the cluster's shared filesystem), its exit code and last
stderr line returned as the job's result. submitit's own scripts and logs go to
``SWEEP/slurm/<job id>_*``.

Signals: Slurm signals every process of a job, so at ``scancel`` and at the time limit the run
itself gets SIGTERM and stops at a batch boundary after a checkpoint. Before the time limit,
submitit's early warning (SIGUSR2) calls :meth:`PointJob.checkpoint`: the run is stopped the same
way and the job is requeued as ``eprun train --resume`` of that run. The child starts with the
early warning ignored (its default action would end it without a checkpoint). Under submitit's
local executor (``--cluster local``, one machine, no Slurm) only the job's process is signalled,
so a :class:`PointJob` forwards the first stop signal to its run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from eprun.errors import SweepError
from eprun.sweep import worker
from eprun.sweep.slurm_settings import SlurmSettings
from eprun.sweep.worker import Outcome, Task

CLUSTERS = ("slurm", "local")
#: seconds between two looks at a job's run
POLL_S = 0.5
#: seconds a run is given to reach a batch boundary and checkpoint after the early warning
CHECKPOINT_GRACE_S = 60
#: job states of a job that has not started yet
_WAITING = ("PENDING", "REQUEUED", "CONFIGURING", "READY", "UNKNOWN", "NO PROCESS AND NO RESULT")
#: job states of a job that still holds (or waits for) resources
_ACTIVE = ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING")


def _submitit():
    try:
        import submitit
    except ImportError:
        raise SweepError("the slurm backend needs submitit: pip install 'eprun[slurm]' "
                         "(or pip install submitit)") from None
    return submitit


def _early_warning() -> int:
    """The signal submitit warns a job with before its time limit (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


@dataclass
class PointJob:
    """A Slurm job's callable: run one point's worker, return its outcome as a dict."""

    task: Task
    _process: Any = field(default=None, repr=False, compare=False)

    def __call__(self) -> dict[str, Any]:
        self._process, offset = worker.start(self.task, new_session=True, ignore=(_early_warning(),))
        forwarded = []

        def forward(signum, frame):  # under Slurm the run gets the signal itself; never twice
            if not forwarded and self._process.poll() is None:
                self._process.send_signal(signum)
            forwarded.append(signum)

        previous = {}
        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:  # polled, not waited on: the early-warning handler may wait for the child meanwhile
            while (code := self._process.poll()) is None:
                time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        outcome = worker.outcome_of(self.task, code, offset)
        return {"exit_code": outcome.exit_code, "error": outcome.error}

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's early warning: stop the run (it checkpoints) and requeue as its resume."""
        submitit = _submitit()
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=CHECKPOINT_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        return submitit.helpers.DelayedSubmission(PointJob(resume_task(self.task)))


def resume_task(task: Task) -> Task:
    """``task`` turned into the resume of the run it made (unchanged when it made none)."""
    run = worker.find_run(Path(task.stdout).parent)
    if not worker.resumable(run):
        return task
    head = task.args[: task.args.index("train")]
    return replace(task, args=head + ("train", "--resume", str(run), "-q"))


@dataclass
class SlurmAttempt:
    task: Task
    job: Any  # submitit.Job

    @property
    def handle(self) -> str:
        return f"slurm job {self.job.job_id}"

    def started(self) -> bool:
        return self.job.state not in _WAITING

    def poll(self) -> Outcome | None:
        if not self.job.done():
            return None
        try:
            result = self.job.result()
        except Exception as exc:  # noqa: BLE001 (a job that failed, timed out or was cancelled: an outcome)
            lines = [line for line in str(exc).splitlines() if line.strip()]
            return Outcome(None, f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500])
        return Outcome(result.get("exit_code"), result.get("error"))

    def stop(self, signum: int) -> None:
        self.job.cancel(check=False)


class SlurmBackend:
    """Jobs through ``submitit.AutoExecutor(cluster=cluster)``, logs in ``folder``; ``jobs``: the
    most that run at once (the array's parallelism), None for no limit."""

    queues = True

    def __init__(self, folder: Path, settings: SlurmSettings, *, cluster: str = "slurm",
                 jobs: int | None = None, name: str = "eprun"):
        if cluster not in CLUSTERS:
            raise SweepError(f"--cluster: expected {' or '.join(CLUSTERS)}, got {cluster!r}")
        self.folder, self.settings, self.cluster, self.jobs, self.name = Path(folder), settings, cluster, jobs, name
        self.slots = sys.maxsize  # Slurm queues them; the array's parallelism limits what runs

    def threads(self) -> int | None:
        return self.settings.cpus

    def _executor(self):
        submitit = _submitit()
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        params = self.settings.executor_parameters(self.cluster)
        if self.jobs:
            params["slurm_array_parallelism"] = self.jobs
        executor.update_parameters(name=self.name, **params)
        return executor

    def launch(self, tasks: list[Task]) -> list[SlurmAttempt]:
        executor = self._executor()
        try:
            with executor.batch():
                jobs = [executor.submit(PointJob(task)) for task in tasks]
        except Exception as exc:  # noqa: BLE001 (sbatch missing or refusing: one line naming why)
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise SweepError(f"submitting {len(tasks)} job(s) to {self.cluster} failed: "
                             f"{type(exc).__name__}: {lines[0] if lines else ''}") from None
        return [SlurmAttempt(task, job) for task, job in zip(tasks, jobs)]

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"kind": "slurm", "cluster": self.cluster, "jobs": self.jobs, "logs": str(self.folder.name),
                "settings": asdict(self.settings)}


def job_active(folder: Path, handle: str, cluster: str) -> bool:
    """Whether the Slurm job recorded as ``handle`` (``slurm job N``) still runs or waits. (A job of
    submitit's local executor runs on this machine, where its run's lock tells whether it still runs.)"""
    if cluster != "slurm" or not handle.startswith("slurm job "):
        return False
    submitit = _submitit()
    job = submitit.SlurmJob(folder=Path(folder), job_id=handle[len("slurm job "):])
    return job.state in _ACTIVE
