"""Continuing a stopped or killed run from its last checkpoint, in the same directory, to the
same weights and metrics as if it had never stopped (bit for bit on CPU)."""

from __future__ import annotations

import time
from pathlib import Path

from eprun import distributed, runs, schema
from eprun.assemble import resolve_device
from eprun.distributed import SINGLE, World
from eprun.errors import EprunError, RecipeError, RunDirError
from eprun.recipe import from_plain, load_recipe, to_yaml
from eprun.runner.drive import drive
from eprun.runner.experiment import assemble, join_world, load_data
from eprun.runner.state import Window, restore


def resume(run_path: Path, *, force: bool = False, overrides: list[str] = (), quiet: bool = False) -> Path:
    """Continue an interrupted or killed run from ``checkpoints/last.pt``, in the same directory.

    A recipe edited since the run started (its ``recipe.yaml`` or ``overrides``) is refused
    unless ``force``; with ``force`` the edit is recorded in ``summary.json``.
    """
    run_dir = runs.run_dir_of(Path(run_path))
    if not distributed.launched():
        with runs.RunLock(run_dir):  # before anything in the run is read or touched: a second resumer changes nothing
            return _resume_locked(run_dir, force, list(overrides), quiet, SINGLE)
    world, _ = join_world(load_recipe(run_dir / runs.RECIPE_FILE, list(overrides)))
    if not world.main:  # rank 0 holds the lock and checks the run; the others follow its verdict
        verdict = distributed.broadcast_text(None, world)
        if verdict != "ok":
            raise RunDirError(verdict)
        return _resume_locked(run_dir, force, list(overrides), quiet, world)
    with runs.RunLock(run_dir):
        try:
            _check_resumable(run_dir, force, list(overrides), world)
        except EprunError as error:
            distributed.broadcast_text(f"rank 0 refused the resume: {error}", world)
            raise
        distributed.broadcast_text("ok", world)
        return _resume_locked(run_dir, force, list(overrides), quiet, world)


def _check_resumable(run_dir: Path, force: bool, overrides: list[str], world: World):
    """The run's summary, last checkpoint, recipe and whether it was edited, once checked:
    not finished, a checkpoint to resume from, the recipe unedited (or ``force``), the same
    number of ranks as it was trained on (or ``force``)."""
    summary_now = runs.read_summary(run_dir) if (run_dir / runs.SUMMARY_FILE).exists() else {}
    if summary_now.get("status") == "finished":
        raise RunDirError(f"{run_dir}: the run has finished; there is nothing to resume")
    last = run_dir / runs.LAST_CHECKPOINT
    if not last.exists():
        raise RunDirError(f"{run_dir}: no {runs.LAST_CHECKPOINT} to resume from (the run was stopped before "
                          f"it started training; start it again)")
    state = runs.load_checkpoint(last)
    recipe = load_recipe(run_dir / runs.RECIPE_FILE, overrides)
    original = from_plain(state["recipe"], f"{last} (embedded recipe)")
    edited = schema.to_plain(recipe) != schema.to_plain(original)
    if edited and not force:
        raise RecipeError(f"{run_dir / runs.RECIPE_FILE}: the recipe differs from the one the run was started "
                          f"with ({_first_difference(schema.to_plain(original), schema.to_plain(recipe))}); "
                          f"resume with --force to continue with the edited recipe")
    trained_on = int(state.get("world_size", 1))
    if trained_on != world.size and not force:
        raise RunDirError(f"{run_dir}: the run was trained by {trained_on} process(es), this launch has "
                          f"{world.size}; resume it with the same number (torchrun --nproc_per_node={trained_on}), "
                          f"or --force to continue with {world.size} (the same maths, other rounding)")
    return summary_now, state, recipe, edited


def _resume_locked(run_dir: Path, force: bool, overrides: list[str], quiet: bool, world: World) -> Path:
    summary_now, state, recipe, edited = _check_resumable(run_dir, force, overrides, world)
    last = run_dir / runs.LAST_CHECKPOINT
    device = join_world(recipe)[1] if world.parallel else resolve_device(recipe.device)
    splits = load_data(recipe, device)
    exp = assemble(recipe, splits, device, world)
    window, epoch_window = Window(device), Window(device)
    pos = restore(exp, state, window, epoch_window, str(last))
    if world.main:
        runs.truncate_metrics(run_dir / runs.METRICS_FILE, pos.metrics_records)
        resumes = list(pos.summary.get("resumes", []))
        resumes.append({"from_step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
                        "edited_recipe": edited, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        pos.summary["resumes"] = resumes
        if edited:
            runs.atomic_write_text(run_dir / runs.RECIPE_FILE, to_yaml(recipe))
    wall_before = float(summary_now.get("wall_time_s") or 0.0)
    return drive(exp, run_dir, pos, window, epoch_window, quiet, wall_before)


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path}: {a!r} → {b!r}"
