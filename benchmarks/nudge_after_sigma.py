"""A whole training step of bundled recipes with the output nudged after σ (``model.nudge:
post_activation``) on the compiled kernel against torch's relaxation, side by side in one
process, with the nudge inside σ on the kernel for reference.

    python -m benchmarks.nudge_after_sigma [--recipe ernoult2019/proto-mlp-2h ...] [--threads 1] [--rounds 2]

Each recipe's net at its initial weights, its rule and optimiser, one batch of random inputs of
the recipe's batch size; rounds alternate the three settings, each figure the best of 3 steps
(ms). Returns them.
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.recipe_step import step_ms

DEFAULT = ["ernoult2020/ep-1h", "ernoult2019/proto-mlp-2h", "ernoult2020/vf-2h", "ernoult2020/cep-1h"]
SETTINGS = (  # (label, model.nudge, EPRUN_NATIVE)
    ("after σ, torch", "post_activation", "0"),
    ("after σ, kernel", "post_activation", "auto"),
    ("inside σ, kernel", "pre_activation", "auto"),
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    from eprun import native
    from eprun.catalog import resolve
    from eprun.recipe import load_recipe

    saved, saved_threads = os.environ.get("EPRUN_NATIVE"), torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results = {}
    try:
        for name in args.recipe or DEFAULT:
            recipes = {nudge: load_recipe(resolve(name), [f"model.nudge={nudge}"]) for _, nudge, _ in SETTINGS}
            b = recipes["post_activation"].data.batch_size
            g = torch.Generator().manual_seed(0)
            x, y = torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
            times = {label: [] for label, _, _ in SETTINGS}
            for _ in range(args.rounds):
                for label, nudge, mode in SETTINGS:
                    os.environ["EPRUN_NATIVE"] = mode
                    native.reset()
                    times[label].append(step_ms(recipes[nudge], x, y))
            results[name] = times
            print(f"{name}, batch {b}, {args.threads} thread(s): "
                  + "; ".join(f"{label} {' · '.join(f'{t:.1f}' for t in ts)} ms" for label, ts in times.items()))
    finally:
        torch.set_num_threads(saved_threads)
        if saved is None:
            os.environ.pop("EPRUN_NATIVE", None)
        else:
            os.environ["EPRUN_NATIVE"] = saved
        native.reset()
    return results


if __name__ == "__main__":
    main()
