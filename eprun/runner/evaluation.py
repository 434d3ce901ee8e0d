"""Scoring: a rule's accuracy and mean loss on a split (eager, or replayed from CUDA graphs), and
a checkpoint rebuilt and scored on its own (``eprun eval``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from eprun import catalog, cuda_graphs, distributed, runs
from eprun.assemble import resolve_device
from eprun.data import Split
from eprun.distributed import SINGLE, World
from eprun.errors import CheckpointError, EprunError, RunDirError
from eprun.recipe import from_plain, load_recipe
from eprun.runner.experiment import Experiment, assemble, load_data


def evaluate(rule, split: Split, batch_size: int, max_batches: int | None = None, world: World = SINGLE,
             exp: Experiment | None = None) -> dict:
    """Accuracy (a fraction) and mean loss of ``rule``'s prediction on ``split`` (with several
    ranks, each scores its share of the split and the sums are combined); replayed from CUDA
    graphs where ``exp``'s plan has them."""
    rows = distributed.shard(len(split), world) if world.parallel else slice(0, len(split))
    sums = torch.zeros(3, dtype=torch.float64, device=split.x.device)  # correct, loss, examples
    for b, start in enumerate(range(rows.start, rows.stop, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        stop = min(start + batch_size, rows.stop)
        x, y = split.x[start:stop], split.y[start:stop]
        scores = replayed(exp, lambda graphs: graphs.evaluate(x, y)) if exp is not None else None
        if scores is None:
            logits, loss = rule.evaluate(x, y)
            scores = loss.sum().double(), (logits.argmax(dim=1) == y).sum()
        sums[0] += scores[1]
        sums[1] += scores[0]
        sums[2] += len(y)
    correct, loss_sum, n = distributed.all_sum_(sums, world).tolist()
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": int(n)}


def replayed(exp: Experiment, call):
    """``call(exp.graphs)`` where the run replays CUDA graphs; None where it does not, or where a
    capture just failed under ``train.cuda_graphs: auto`` (the step then runs eagerly from now on,
    the reason kept in ``summary.json``). Under ``on`` a failed capture is an error."""
    if exp.graphs is None:
        return None
    try:
        return call(exp.graphs)
    except cuda_graphs.CaptureFailed as failure:
        if exp.graph_plan.mode == "on":
            raise EprunError(f"train.cuda_graphs: on, but a step could not be recorded as a CUDA graph: {failure} "
                             f"(auto falls back to eager steps)") from failure
        exp.graphs_fell_back(failure)
        return None


def evaluate_checkpoint(checkpoint: Path, split: str = "test", recipe_path: Path | None = None,
                        device: str | None = None) -> dict:
    """Rebuild the network of a checkpoint and score it on ``split``. The recipe is ``recipe_path``
    (a file or a bundled name), else the recipe.yaml of the run the checkpoint is in, else the one
    embedded in the checkpoint (a checkpoint copied out of its run). Weights holding NaN or Inf are
    refused: there is nothing to score."""
    state = runs.load_checkpoint(Path(checkpoint))
    run_recipe = _run_recipe_of(Path(checkpoint))
    if recipe_path is not None:
        recipe = load_recipe(catalog.resolve(str(recipe_path)))
    elif run_recipe is not None:
        recipe = load_recipe(run_recipe)
    elif "recipe" in state:
        recipe = from_plain(state["recipe"], f"{checkpoint} (embedded recipe)")
    else:
        raise CheckpointError(f"{checkpoint}: no recipe in its run or in the checkpoint; pass --recipe")
    dev = resolve_device(device or recipe.device)
    splits = load_data(recipe, dev)
    exp = assemble(recipe, splits, dev)
    try:
        exp.net.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{checkpoint}: does not fit the recipe's network ({first})") from None
    for name, p in exp.net.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{checkpoint}: the weights hold NaN or Inf ({name}); the run that wrote them "
                                  f"diverged, and there is nothing to score")
    target = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if target is None:
        raise EprunError(f"{checkpoint}: the run has no validation split (data.val_size: 0)")
    result = evaluate(exp.rule, target, recipe.data.eval_batch_size)
    loss = result["loss"] if math.isfinite(result["loss"]) else None  # JSON has no NaN or Inf
    return {"accuracy": result["accuracy"], "loss": loss, "split": split, "n": result["n"]}


def _run_recipe_of(checkpoint: Path) -> Path | None:
    """The recipe.yaml of the run a checkpoint lies in, or None outside a run."""
    try:
        path = runs.run_dir_of(checkpoint) / runs.RECIPE_FILE
    except RunDirError:
        return None
    return path if path.exists() else None
