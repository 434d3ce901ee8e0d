"""From a recipe to the objects of an experiment: device, seeded generators, network, rule.

One seed drives every random draw. Each purpose (initialisation, data split, shuffling,
β-sign draws) gets its own ``torch.Generator`` seeded from (seed, purpose), so adding a draw
for one purpose never shifts the others.
"""

from __future__ import annotations

import hashlib

import torch

from eprun.nets import NETWORKS
from eprun.recipe import Recipe
from eprun.rules import RULES


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one purpose, a pure function of the recipe's seed."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, purpose))


def resolve_device(spec: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        from eprun.errors import RecipeError

        raise RecipeError(f"device: {spec!r} asked for but CUDA is not available here (use auto or cpu)")
    return device


def build_network(recipe: Recipe, input_shape: tuple[int, ...], num_classes: int,
                  device: torch.device, dtype: torch.dtype = torch.float32):
    net_cls = NETWORKS[recipe.model.kind]
    net = net_cls(recipe.model, input_shape, num_classes, generator(recipe.seed, "init"))
    return net.to(device=device, dtype=dtype)


def build_rule(recipe: Recipe, net):
    return RULES[recipe.rule.kind](recipe.rule, net, generator(recipe.seed, "rule"))
