"""A whole training step of bundled recipes on the compiled kernel's block path against the same
kernel in pairs (a build with ``EPRUN_NO_BLOCKS``), side by side in one process.

    python -m benchmarks.recipe_step [--recipe ernoult2020/vf-2h ...] [--threads 1] [--rounds 2]

Each recipe's net at its initial weights, its rule and optimiser, one batch of random inputs of
the recipe's batch size; rounds alternate the two builds, each figure the best of 3 steps (ms).
Returns them.
"""

from __future__ import annotations

import argparse
import time

import torch

DEFAULT = ["ernoult2020/cep-2h", "ernoult2020/cvf-2h", "ernoult2020/vf-2h"]


def step_ms(recipe, x, y) -> float:
    from eprun.assemble import build_network, build_rule
    from eprun.optim import build_optimizer

    net = build_network(recipe, tuple(x.shape[1:]), 10, torch.device("cpu"))
    rule = build_rule(recipe, net)
    optimizer = build_optimizer(recipe.optim, net.layer_groups())
    rule.attach_optimizer(optimizer)

    def step():
        optimizer.zero_grad(set_to_none=False)
        rule.train_step(x, y)
        if not rule.steps_optimizer:
            optimizer.step()

    step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def recipe_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the scripts that time whole training steps of bundled recipes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    return parser


def main(argv=None) -> dict:
    args = recipe_arguments(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.variants import variant
    from eprun.catalog import resolve
    from eprun.recipe import load_recipe

    results = {}
    for name in args.recipe or DEFAULT:
        recipe = load_recipe(resolve(name))
        results[name] = side_by_side(name, {"pairs": (recipe, lambda: variant("EPRUN_NO_BLOCKS")),
                                            "blocks": (recipe, lambda: variant())}, args.rounds, args.threads)
    return results


def compare_recipes(argv, description: str, default: list[str], settings_of) -> dict:
    """The scripts' common main: parse :func:`recipe_arguments` from ``argv`` and, at the asked
    thread count (restored afterwards), time :func:`side_by_side` the settings
    ``settings_of(name)`` gives for each recipe asked (``default`` if none). Returns the figures
    by recipe."""
    from benchmarks.variants import threads_kept

    args = recipe_arguments(description).parse_args(argv)
    results = {}
    with threads_kept():
        torch.set_num_threads(args.threads)
        for name in args.recipe or default:
            results[name] = side_by_side(name, settings_of(name), args.rounds, args.threads)
    return results


def side_by_side(name: str, settings: dict, rounds: int, threads: int) -> dict[str, list[float]]:
    """``settings``: label → (recipe, a context manager factory for its timing); ``rounds`` rounds
    alternate them on one batch of random inputs of the first recipe's batch size. Prints and
    returns each setting's figures (ms)."""
    b = next(iter(settings.values()))[0].data.batch_size
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
    times = {label: [] for label in settings}
    for _ in range(rounds):
        for label, (recipe, setting) in settings.items():
            with setting():
                times[label].append(step_ms(recipe, x, y))
    print(f"{name}, batch {b}, {threads} thread(s): "
          + "; ".join(f"{label} {' · '.join(f'{t:.1f}' for t in ts)} ms" for label, ts in times.items()))
    return times


if __name__ == "__main__":
    main()
