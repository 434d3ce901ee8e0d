"""What runs for one point, on any backend: an ordinary ``eprun train`` in its own process.

A point's worker is ``python -m eprun [--threads K] train SWEEP/recipe/R.yaml -s … --out
SWEEP/p000 -q`` (a fresh start), or ``python -m eprun [--threads K] train --resume RUN -q`` when the
point has a run with a checkpoint. Its stdout and stderr are appended to ``p000/stdout.txt`` and
``p000/stderr.txt``. The run it makes is the run directory inside ``p000/``; its outcome is the
status its ``summary.json`` ends with, else what the exit code says (a signal: ``interrupted``;
anything else: ``failed``, with the last line the worker wrote on stderr).

The worker imports the same eprun as the process that plans the sweep: the folder holding this
package is put first on its ``PYTHONPATH``.

This module is imported on Slurm's nodes to run :func:`run_task`; it stays free of torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from eprun.runs import LAST_CHECKPOINT, RECIPE_FILE, SUMMARY_FILE
from eprun.sweep.record import FAILED, FINISHED, INTERRUPTED, RUN_OUTCOMES, STDERR_FILE, STDOUT_FILE, Point, Sweep


@dataclass(frozen=True)
class Task:
    """One attempt at one point: the worker's arguments (after the interpreter) and where it writes."""

    point_id: str
    args: tuple[str, ...]
    cwd: str  #: the directory the sweep was started in (relative paths in a recipe resolve alike)
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Outcome:
    """How a worker ended: its exit code (None: unknown, e.g. a Slurm job that never ran) and the
    last line it wrote on stderr, or the backend's own reason when it did not run."""

    exit_code: int | None
    error: str | None


def find_run(point_dir: Path) -> Path | None:
    """The run directory a point made: the newest folder in ``point_dir`` holding a recipe.yaml
    (a fresh restart of a point that never reached its first checkpoint makes a second one)."""
    try:
        runs = [d for d in Path(point_dir).iterdir() if d.is_dir() and (d / RECIPE_FILE).is_file()]
    except OSError:
        return None
    return max(runs, key=lambda d: d.name) if runs else None


def run_status(run_dir: Path | None) -> str | None:
    """The status a run's summary.json holds, or None (no run, no summary, unreadable)."""
    if run_dir is None:
        return None
    try:
        status = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def settle(exit_code: int | None, run_dir: Path | None) -> str:
    """A finished worker's point status: its run's outcome where summary.json holds one, else
    ``interrupted`` for a worker ended by a signal (exit 128 + n, or killed: −n), else ``failed``."""
    status = run_status(run_dir)
    if status in RUN_OUTCOMES:
        return status
    if exit_code is not None and (exit_code < 0 or exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM)):
        return INTERRUPTED
    return FAILED


def resumable(run_dir: Path | None) -> bool:
    """Whether a point continues its run (``train --resume``) rather than starting afresh."""
    return run_dir is not None and (run_dir / LAST_CHECKPOINT).is_file() and run_status(run_dir) != FINISHED


def build_task(sweep: Sweep, point: Point, threads: int | None) -> Task:
    """The next attempt at ``point``: resume its run where it has a checkpoint, else start afresh."""
    folder = sweep.point_dir(point).resolve()
    head = ("-m", "eprun") + (("--threads", str(threads)) if threads else ())
    run_dir = sweep.run_dir(point)
    if resumable(run_dir):
        args = head + ("train", "--resume", str(run_dir.resolve()), "-q")
    else:
        sets = tuple(part for override in point.overrides for part in ("-s", override))
        args = head + ("train", str((sweep.path / sweep.recipe_copy).resolve()), *sets, "--out", str(folder), "-q")
    cwd = sweep.cwd if sweep.cwd and Path(sweep.cwd).is_dir() else os.getcwd()
    return Task(point.id, args, cwd, str(folder / STDOUT_FILE), str(folder / STDERR_FILE))


def worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with the folder holding this eprun first on PYTHONPATH."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def last_line(path: Path, offset: int = 0) -> str | None:
    """The last non-empty line of ``path`` past byte ``offset`` (what one attempt wrote), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            tail = f.read()[-8192:]
    except OSError:
        return None
    lines = [line.strip() for line in tail.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:500] if lines else None


def size_of(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def start(task: Task, *, new_session: bool, ignore: tuple[int, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Start ``task``'s worker; returns the process and the size its stderr file had before.

    ``new_session``: the worker gets no terminal signal (the sweep forwards one stop request
    itself; two would make it stop at once, without its checkpoint). ``ignore``: signals the
    worker starts with ignored (Slurm's early-warning signal, which would otherwise end it)."""
    Path(task.stdout).parent.mkdir(parents=True, exist_ok=True)
    offset = size_of(Path(task.stderr))

    def before_exec():  # runs in the child between fork and exec: only async-signal-safe calls
        for signum in ignore:
            signal.signal(signum, signal.SIG_IGN)

    with open(task.stdout, "ab") as out, open(task.stderr, "ab") as err:
        process = subprocess.Popen([sys.executable, *task.args], cwd=task.cwd, env=worker_env(), stdout=out,
                                   stderr=err, stdin=subprocess.DEVNULL, start_new_session=new_session,
                                   preexec_fn=before_exec if ignore else None)
    return process, offset


def outcome_of(task: Task, exit_code: int | None, offset: int) -> Outcome:
    """The outcome of a worker that ended with ``exit_code``."""
    return Outcome(exit_code, None if exit_code == 0 else last_line(Path(task.stderr), offset))
