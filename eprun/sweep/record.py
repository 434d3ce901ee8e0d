"""The sweep directory and its record, ``sweep.json``.

Layout::

    runs/sweep-<recipe-name>-<YYYYmmdd-HHMMSS>[-n]/
      sweep.json          the recipe, the grid, and each point: overrides, status, run, exit code, error
      recipe/<file>.yaml  the recipe as it was when the sweep started, under its own file name (so a
                          recipe without a name: key names its runs alike); every point trains from it
      p000/               point 0: its run directory (an ordinary one) and the worker's output
        <name>-<YYYYmmdd-HHMMSS>/   recipe.yaml env.json metrics.jsonl summary.json checkpoints/ plots/
        stdout.txt  stderr.txt
      p001/ …
      slurm/              submitit's scripts and logs (Slurm backend)

Each point trains into its own folder, so the run it made is found from that folder alone,
whichever machine ran it and however it stopped. ``sweep.json`` is only written by the process
driving the sweep, each time atomically (temp file + rename), so a reader or a killed sweep
never sees half of it.

Point statuses: ``pending`` (not started), ``submitted`` (queued on Slurm), ``running``, then the
run's own outcome: ``finished``, ``diverged``, ``failed`` or ``interrupted``. ``finished`` and
``diverged`` are final (a diverged run resumed replays the same divergence, bit for bit); a
resumed sweep runs every other point again.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from eprun.errors import SweepError
from eprun.runs import RECIPE_FILE, atomic_write_json

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "eprun-sweep-1"
RECIPE_COPY_DIR = "recipe"
SLURM_LOGS = "slurm"
STDOUT_FILE = "stdout.txt"
STDERR_FILE = "stderr.txt"

PENDING, SUBMITTED, RUNNING = "pending", "submitted", "running"
FINISHED, DIVERGED, FAILED, INTERRUPTED = "finished", "diverged", "failed", "interrupted"
#: a point with one of these statuses is not run again by a resumed sweep
FINAL = (FINISHED, DIVERGED)
#: the statuses a run's summary.json ends with
RUN_OUTCOMES = (FINISHED, DIVERGED, FAILED, INTERRUPTED)


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Point:
    """One point of the grid and what became of it."""

    index: int
    id: str  #: its folder in the sweep directory, ``p000``
    values: dict[str, str]  #: its value on each axis, as typed
    overrides: list[str]  #: every override its run was started with (the fixed ones first)
    status: str = PENDING
    run: str | None = None  #: its run directory, relative to the sweep directory
    exit_code: int | None = None  #: the worker's, for the last attempt
    error: str | None = None  #: the last line the worker wrote on stderr, when it did not finish
    job: str | None = None  #: the last attempt's worker: ``pid N`` or ``slurm job N``
    attempts: int = 0
    started_at: str | None = None
    ended_at: str | None = None

    @property
    def label(self) -> str:
        """``seed=0 rule.beta=0.1`` (the point's axis values)."""
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "(no axis)"


@dataclass
class Sweep:
    """``sweep.json`` in memory; :meth:`save` writes it (atomically)."""

    path: Path  #: the sweep directory (not stored: the record moves with its folder)
    name: str
    recipe: str  #: the recipe file the sweep was started from
    recipe_copy: str  #: its copy, relative to the sweep directory
    cwd: str  #: the directory the sweep was started in; every worker runs there
    fixed: list[str]
    grid: dict[str, list[str]]
    backend: dict[str, Any]
    points: list[Point]
    status: str = RUNNING
    created_at: str = field(default_factory=now_iso)
    updated_at: str | None = None
    format: str = SWEEP_FORMAT

    def point_dir(self, point: Point) -> Path:
        return self.path / point.id

    def run_dir(self, point: Point) -> Path | None:
        return None if point.run is None else self.path / point.run

    def counts(self) -> dict[str, int]:
        """How many points have each status, in first-seen order."""
        counts: dict[str, int] = {}
        for point in self.points:
            counts[point.status] = counts.get(point.status, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "name": self.name, "status": self.status, "recipe": self.recipe,
                "recipe_copy": self.recipe_copy, "cwd": self.cwd, "fixed": self.fixed, "grid": self.grid,
                "backend": self.backend,
                "created_at": self.created_at, "updated_at": self.updated_at, "counts": self.counts(),
                "points": [asdict(p) for p in self.points]}

    def save(self) -> None:
        self.updated_at = now_iso()
        atomic_write_json(self.path / SWEEP_FILE, self.to_json())


def is_sweep_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / SWEEP_FILE).is_file()


def load_sweep(path: Path) -> Sweep:
    """Read ``path/sweep.json``; a missing, unreadable or malformed record is a :class:`SweepError`."""
    path = Path(path)
    file = path / SWEEP_FILE
    if not path.is_dir():
        raise SweepError(f"{path}: no such sweep directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = " (it is a run directory: resume it with eprun train --resume)" if (path / RECIPE_FILE).is_file() else ""
        raise SweepError(f"{path}: not a sweep directory (no {SWEEP_FILE}){hint}") from None
    except (OSError, ValueError) as exc:
        raise SweepError(f"{file}: cannot read the sweep record ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SweepError(f"{file}: not an eprun sweep record (format {found!r}, expected {SWEEP_FORMAT!r})")
    try:
        point_keys = {f.name for f in fields(Point)}
        points = [Point(**{k: v for k, v in p.items() if k in point_keys}) for p in data["points"]]
        return Sweep(path=path, name=data["name"], recipe=data["recipe"], recipe_copy=data["recipe_copy"],
                     cwd=data["cwd"], fixed=list(data["fixed"]),
                     grid=dict(data["grid"]), backend=dict(data["backend"]), points=points,
                     status=data["status"], created_at=data["created_at"], updated_at=data.get("updated_at"))
    except (KeyError, TypeError, AttributeError) as exc:
        raise SweepError(f"{file}: the sweep record is incomplete or malformed ({type(exc).__name__}: {exc})") from None


def sweep_runs(path: Path) -> list[Path]:
    """The run directories of a sweep's points that have one, in point order."""
    sweep = load_sweep(path)
    found = [sweep.run_dir(p) for p in sweep.points]
    return [run for run in found if run is not None and (run / RECIPE_FILE).is_file()]
