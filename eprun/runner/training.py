"""Starting a run: a recipe trained into a new run directory, and its twin where the rule names
one (``rule.pair_with``)."""

from __future__ import annotations

import sys
from pathlib import Path

from eprun import distributed, runs, schema
from eprun.recipe import Recipe, from_plain, to_yaml
from eprun.runner.drive import drive, storage_failure, write_summary_if_possible
from eprun.runner.experiment import assemble, join_world, load_data
from eprun.runner.state import Position, Window, checkpoint_state


def train(recipe: Recipe, out_parent: Path, *, quiet: bool = False, argv: list[str] | None = None) -> Path:
    """Train a recipe into a new run directory and return its path. Launched by torchrun, every
    rank trains its shard of each batch (:mod:`eprun.distributed`) and rank 0 writes the run."""
    world, device = join_world(recipe)
    splits = load_data(recipe, device)  # data errors surface before anything is written
    exp = assemble(recipe, splits, device, world)
    if not world.main:
        run_dir = Path(distributed.broadcast_text(None, world))
        pos, window, epoch_window = Position(summary={}), Window(device), Window(device)
        return drive(exp, run_dir, pos, window, epoch_window, quiet, wall_before=0.0)
    run_dir = runs.create_run_dir(Path(out_parent), recipe.name)
    distributed.broadcast_text(str(run_dir), world)
    with runs.RunLock(run_dir):
        runs.atomic_write_text(run_dir / runs.RECIPE_FILE, to_yaml(recipe))
        runs.write_env(run_dir, device=str(device), argv=list(argv if argv is not None else sys.argv),
                       extra={**world.describe(), "cuda_graphs": exp.graph_plan.record()})
        summary = {"status": "running", "name": recipe.name, "model": recipe.model.kind,
                   "rule": recipe.rule.label(), "dataset": recipe.data.dataset, "seed": recipe.seed,
                   "device": str(device), "epochs": recipe.train.epochs, "epochs_completed": 0,
                   "n_train": len(splits.train), "n_val": len(splits.val) if splits.val else 0,
                   "n_test": len(splits.test)}
        runs.write_summary(run_dir, summary)
        pos, window, epoch_window = Position(summary=summary), Window(device), Window(device)
        # a step-0 checkpoint: a run killed at any moment, even before its first batch, resumes
        try:
            runs.save_checkpoint(run_dir / runs.LAST_CHECKPOINT, checkpoint_state(exp, pos, window, epoch_window))
        except OSError as exc:
            error = storage_failure(run_dir, summary, exc)
            write_summary_if_possible(run_dir, summary)
            raise error from None
        return drive(exp, run_dir, pos, window, epoch_window, quiet, wall_before=0.0)


def paired_recipe(recipe: Recipe) -> Recipe | None:
    """The twin of a recipe whose rule names one (``rule.pair_with: bptt``): same seed (so the
    same initial weights and data order), same network, the rule swapped for the paired one."""
    twin_rule = recipe.rule.paired_rule()
    if twin_rule is None:
        return None
    plain = schema.to_plain(recipe)
    plain["name"] = f"{recipe.name}-{twin_rule.kind}"
    plain["rule"] = schema.to_plain(twin_rule)
    return from_plain(plain, f"{recipe.name} (paired {twin_rule.kind} run)")
