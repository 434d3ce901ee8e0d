"""A whole training step of the target propagation nets' recipes with the ELU through exp and
the pooling through a channels-last copy (eprun/nets/elu.py, eprun/nets/pooling.py) against
torch's ``F.elu`` and ``F.max_pool2d`` on the maps as they come, side by side in one process.

    python -m benchmarks.ff_elu_pool [--recipe ernoult2022/mnist-lenet-ldrl ...] [--threads 1] [--rounds 2]

Each recipe's net at its initial weights, its rule and optimiser (the feedback layers' warm-up
on the first batch left out), one batch of random inputs of the recipe's batch size; rounds
alternate the two settings, each figure the best of 3 steps (ms). Returns them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.recipe_step import recipe_arguments, side_by_side
from benchmarks.variants import threads_kept

DEFAULT = ["ernoult2022/mnist-lenet-ldrl", "ernoult2022/mnist-lenet-vanilla-dtp", "ernoult2022/mnist-lenet-bp"]


@contextlib.contextmanager
def torch_elu_and_pool():
    """Nets built inside the block take ``F.elu`` and pool with ``F.max_pool2d`` as they come."""
    from eprun.nets import feedforward

    saved = feedforward.FF_ACTIVATIONS["elu"], feedforward.max_pool_with_indices
    feedforward.FF_ACTIVATIONS["elu"] = F.elu
    feedforward.max_pool_with_indices = lambda z, p: F.max_pool2d(z, p, p, return_indices=True)
    try:
        yield
    finally:
        feedforward.FF_ACTIVATIONS["elu"], feedforward.max_pool_with_indices = saved


def main(argv=None) -> dict:
    args = recipe_arguments(__doc__.splitlines()[0]).parse_args(argv)

    from eprun.catalog import resolve
    from eprun.recipe import load_recipe

    results = {}
    with threads_kept():
        torch.set_num_threads(args.threads)
        for name in args.recipe or DEFAULT:
            recipe = load_recipe(resolve(name))
            if recipe.rule.kind != "bp":
                recipe = load_recipe(resolve(name), ["rule.feedback_warmup_iterations=0"])
            results[name] = side_by_side(name, {"F.elu, NCHW pooling": (recipe, torch_elu_and_pool),
                                                "exp ELU, channels-last pooling": (recipe, contextlib.nullcontext)},
                                         args.rounds, args.threads)
    return results


if __name__ == "__main__":
    main()
