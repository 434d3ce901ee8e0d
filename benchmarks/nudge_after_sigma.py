"""A whole training step of bundled recipes with the output nudged after σ (``model.nudge:
post_activation``) on the compiled kernel against torch's relaxation, side by side in one
process, with the nudge inside σ on the kernel for reference.

    python -m benchmarks.nudge_after_sigma [--recipe ernoult2019/proto-mlp-2h ...] [--threads 1] [--rounds 2]

Each recipe's net at its initial weights, its rule and optimiser, one batch of random inputs of
the recipe's batch size; rounds alternate the three settings, each figure the best of 3 steps
(ms). Returns them.
"""

from __future__ import annotations

from benchmarks.recipe_step import compare_recipes
from benchmarks.variants import engine

DEFAULT = ["ernoult2020/ep-1h", "ernoult2019/proto-mlp-2h", "ernoult2020/vf-2h", "ernoult2020/cep-1h"]
SETTINGS = (  # (label, model.nudge, EPRUN_NATIVE)
    ("after σ, torch", "post_activation", "0"),
    ("after σ, kernel", "post_activation", "auto"),
    ("inside σ, kernel", "pre_activation", "auto"),
)


def main(argv=None) -> dict:
    from eprun.catalog import resolve
    from eprun.recipe import load_recipe

    def settings_of(name):
        return {label: (load_recipe(resolve(name), [f"model.nudge={nudge}"]), lambda mode=mode: engine(mode))
                for label, nudge, mode in SETTINGS}

    return compare_recipes(argv, __doc__.splitlines()[0], DEFAULT, settings_of)


if __name__ == "__main__":
    main()
