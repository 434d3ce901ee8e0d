"""``eprun train --fast-dev-run``: a recipe checked end to end in seconds, on synthetic data."""

from __future__ import annotations

from eprun import schema
from eprun.assemble import resolve_device
from eprun.data import synthetic_like
from eprun.recipe import Recipe, from_plain
from eprun.runner.divergence import Diverged, first_non_finite
from eprun.runner.evaluation import evaluate
from eprun.runner.experiment import assemble


def fast_dev_run(recipe: Recipe) -> dict:
    """Two training batches and one evaluation batch on synthetic data shaped like the dataset.

    Validates that the recipe assembles and runs end to end — network, rule, optimiser,
    schedule, augmentation — in seconds: batches of at most 4 examples, relaxations of at most
    T = 5, K = 3 steps, at most 2 feedback iterations per layer for target propagation. Needs
    no data files and writes nothing.
    """
    recipe = _shrunk(recipe)
    device = resolve_device(recipe.device)
    splits = synthetic_like(recipe.data.dataset, 2 * recipe.data.batch_size, recipe.seed, device)
    exp = assemble(recipe, splits, device)
    losses = []
    for b in range(2):
        x = splits.train.x[b * recipe.data.batch_size:(b + 1) * recipe.data.batch_size]
        y = splits.train.y[b * recipe.data.batch_size:(b + 1) * recipe.data.batch_size]
        exp.optimizer.zero_grad(set_to_none=False)
        _, loss = exp.rule.train_step(x, y)
        where = first_non_finite(exp, loss)
        if where is not None:
            raise Diverged(f"fast-dev-run: NaN/Inf in {where} at batch {b + 1}")
        if not exp.rule.steps_optimizer:
            exp.optimizer.step()
        losses.append(float(loss.mean()))
    result = evaluate(exp.rule, splits.test, recipe.data.eval_batch_size, max_batches=1)
    return {"train_losses": losses, **result}


def _shrunk(recipe: Recipe) -> Recipe:
    plain = schema.to_plain(recipe)
    plain["data"]["batch_size"] = min(plain["data"]["batch_size"], 4)
    plain["data"]["eval_batch_size"] = min(plain["data"]["eval_batch_size"], 4)
    for key, cap in (("T", 5), ("K", 3), ("feedback_iterations", 2)):
        value = plain["rule"].get(key)
        if isinstance(value, list):
            plain["rule"][key] = [min(v, cap) for v in value]
        elif value is not None:
            plain["rule"][key] = min(value, cap)
    shrunk = from_plain(plain, f"{recipe.name} (fast-dev-run)")
    shrunk.source = recipe.source or recipe.name
    return shrunk
