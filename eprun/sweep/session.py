"""Starting a sweep and resuming one: everything between the command line and the driver's loop.

A new sweep is checked in full before anything is made: the grid, each point's recipe (through
the ordinary recipe loading, so a bad value is refused as ``eprun train -s`` would refuse it,
naming the override) and the backend's settings. Only then is the sweep directory created, the
recipe copied into it and sweep.json written.

Resuming (``eprun sweep --resume SWEEP_DIR``) re-reads sweep.json and each point's run: a point
whose run has finished (or diverged) is skipped, one with a checkpoint continues it (``eprun
train --resume``), one without starts afresh. It is refused while another process drives the
sweep (the sweep's lock) or still writes one of its runs (the run's lock, or a Slurm job still
queued or running).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from eprun import catalog, runs
from eprun.errors import SweepError
from eprun.recipe import load_recipe
from eprun.runs.lock import writer_alive
from eprun.sweep import record, worker
from eprun.sweep.backend import Backend
from eprun.sweep.driver import Ending, drive
from eprun.sweep.grid import Grid, parse_grid, point_overrides
from eprun.sweep.record import FINAL, INTERRUPTED, RUNNING, SUBMITTED, Point, Sweep
from eprun.sweep.slurm_settings import FLAG_KEYS, SlurmSettings, read_settings

BACKENDS = ("local", "slurm")


@dataclass
class BackendOptions:
    """What the command line said about the backend (None: not given)."""

    kind: str | None = None
    jobs: int | None = None
    cluster: str | None = None
    slurm_config: Path | None = None
    slurm_flags: dict[str, Any] = field(default_factory=dict)


@dataclass
class BackendChoice:
    """The backend's settings, checked: ``kind`` local or slurm, its parallelism, Slurm's resources."""

    kind: str
    jobs: int | None
    cluster: str = "slurm"
    settings: SlurmSettings | None = None

    def build(self, sweep: Sweep) -> Backend:
        if self.kind == "local":
            from eprun.sweep.local import LocalBackend

            return LocalBackend(self.jobs or 1)
        from eprun.sweep.slurm import SlurmBackend

        return SlurmBackend(sweep.path / record.SLURM_LOGS, self.settings, cluster=self.cluster, jobs=self.jobs,
                            name=f"eprun-{sweep.name}")


def choose_backend(options: BackendOptions, recorded: dict[str, Any] | None = None) -> BackendChoice:
    """The backend from the options, falling back on a resumed sweep's ``recorded`` one."""
    recorded = recorded or {}
    kind = options.kind or recorded.get("kind") or "local"
    if kind not in BACKENDS:
        raise SweepError(f"--backend: expected local or slurm, got {kind!r}")
    same = recorded.get("kind") == kind
    jobs = options.jobs if options.jobs is not None else recorded.get("jobs") if same else None
    if jobs is not None and jobs < 1:
        raise SweepError(f"--jobs must be ≥ 1, got {jobs}")
    slurm_given = [f"--{k.replace('_', '-')}" for k, v in options.slurm_flags.items() if v is not None]
    slurm_given += ["--slurm-config"] if options.slurm_config else []
    slurm_given += ["--cluster"] if options.cluster else []
    if kind == "local":
        if slurm_given:
            raise SweepError(f"{', '.join(slurm_given)}: Slurm settings, for --backend slurm only")
        return BackendChoice("local", jobs or 1)
    from eprun.sweep.slurm import CLUSTERS

    cluster = options.cluster or (recorded.get("cluster") if same else None) or "slurm"
    if cluster not in CLUSTERS:
        raise SweepError(f"--cluster: expected slurm (sbatch) or local (submitit's local executor, one machine), "
                         f"got {cluster!r}")
    base = recorded.get("settings") if same else None
    flags = {k: options.slurm_flags.get(k) for k in FLAG_KEYS}
    settings = read_settings(options.slurm_config, flags, base)
    return BackendChoice("slurm", jobs, cluster, settings)


def plan(recipe_arg: str, sets: list[str]) -> tuple[Path, list[dict[str, str]], Grid, str]:
    """Check the grid and every point's recipe; returns the recipe file, the points' axis values,
    the grid and the sweep's name. Nothing is written."""
    path = catalog.resolve(recipe_arg)
    grid = parse_grid(sets)
    values = grid.points()
    name = None
    for point_values in values:
        recipe = load_recipe(path, point_overrides(grid, point_values))
        if recipe.rule.paired_rule() is not None:
            raise SweepError(f"{path}: rule.pair_with trains two runs per start, which a sweep point cannot hold; "
                             f"sweep rule.kind instead (e.g. -s rule.kind=ep,bptt: one seed gives both the same "
                             f"initial weights)")
        name = name or recipe.name
    return path, values, grid, name


def start(recipe_arg: str, sets: list[str], out_parent: Path, options: BackendOptions,
          log: Callable[[str], None]) -> tuple[Sweep, Ending]:
    """Plan a sweep, create its directory and run every point."""
    choice = choose_backend(options)
    path, values, grid, name = plan(recipe_arg, sets)
    try:
        sweep_dir = runs.create_stamped_dir(out_parent, f"sweep-{name}")
    except OSError as exc:
        raise SweepError(f"cannot create a sweep directory in {out_parent} ({exc.strerror or exc})") from None
    width = max(3, len(str(len(values) - 1)))
    points = [Point(index=i, id=f"p{i:0{width}d}", values=v, overrides=point_overrides(grid, v))
              for i, v in enumerate(values)]
    copy = Path(record.RECIPE_COPY_DIR) / path.name
    with runs.RunLock(sweep_dir, what="sweep"):
        (sweep_dir / copy).parent.mkdir()
        runs.atomic_write_bytes(sweep_dir / copy, path.read_bytes())
        sweep = Sweep(path=sweep_dir, name=name, recipe=str(path.resolve()), recipe_copy=copy.as_posix(),
                      cwd=os.getcwd(), fixed=list(grid.fixed), grid=grid.as_dict(), backend={}, points=points)
        backend = choice.build(sweep)
        sweep.backend = backend.describe()
        sweep.save()
        log(f"sweep {sweep_dir}: {len(points)} point(s) of {path}; {_describe(choice, backend)}")
        return sweep, drive(sweep, backend, points, log)


def resume(sweep_dir: Path, options: BackendOptions, log: Callable[[str], None]) -> tuple[Sweep, Ending]:
    """Run a sweep's unfinished points again (continuing their runs where they have a checkpoint)."""
    sweep = record.load_sweep(sweep_dir)
    choice = choose_backend(options, sweep.backend)
    with runs.RunLock(sweep.path, what="sweep"):
        todo = reconcile(sweep)
        if not todo:
            sweep.status = record.FINISHED if all(p.status == record.FINISHED for p in sweep.points) else record.FAILED
            sweep.save()
            log(f"sweep {sweep.path}: nothing to resume ({_counts(sweep)})")
            return sweep, Ending(None)
        backend = choice.build(sweep)
        log(f"sweep {sweep.path}: resuming {len(todo)} of {len(sweep.points)} point(s) ({_counts(sweep)}); "
            f"{_describe(choice, backend)}")
        return sweep, drive(sweep, backend, todo, log)


def reconcile(sweep: Sweep) -> list[Point]:
    """Bring each point's record in line with its run on disk; return the points to run again."""
    from eprun.sweep.slurm import job_active

    for point in sweep.points:
        run = worker.find_run(sweep.point_dir(point))
        if run is not None:
            point.run = str(run.relative_to(sweep.path))
        if run is not None and writer_alive(run):
            raise SweepError(f"{sweep.path}: {point.id}'s run {run} is being written by another process "
                             f"(a worker of a sweep that was stopped hard?); wait for it to end, or stop it, "
                             f"then resume")
        if point.status in (SUBMITTED, RUNNING) and point.job and sweep.backend.get("kind") == "slurm":
            if job_active(sweep.path / record.SLURM_LOGS, point.job, sweep.backend.get("cluster", "slurm")):
                raise SweepError(f"{sweep.path}: {point.id} is still on Slurm ({point.job}); wait for it to end "
                                 f"or cancel it (scancel {point.job.split()[-1]}), then resume")
        outcome = worker.run_status(run)
        if point.status not in FINAL and outcome in FINAL:
            point.status = outcome  # it ended after the sweep that ran it stopped
        elif point.status in (SUBMITTED, RUNNING):
            point.status = INTERRUPTED  # the sweep that ran it stopped without hearing its end
    return [p for p in sweep.points if p.status not in FINAL]


def _counts(sweep: Sweep) -> str:
    return ", ".join(f"{n} {status}" for status, n in sweep.counts().items())


def _describe(choice: BackendChoice, backend: Backend) -> str:
    if choice.kind == "local":
        return f"local, {backend.slots} at once, {backend.threads()} thread(s) each"
    where = "Slurm" if choice.cluster == "slurm" else "submitit's local executor"
    settings = {k: v for k, v in asdict(choice.settings).items() if v not in (None, [])}
    limit = f", at most {choice.jobs} at once" if choice.jobs else ""
    return f"{where} ({', '.join(f'{k}={v}' for k, v in settings.items())}){limit}; logs in {record.SLURM_LOGS}/"
