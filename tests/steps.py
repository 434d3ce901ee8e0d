"""One training step of a small net, shared by the tests that compare a step's weight change
across devices and precisions."""

from __future__ import annotations

import torch


def weight_change(recipe_dict: dict, device: str, batch: int, data_seed: int, setting: str = "float32",
                  dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], str]:
    """The weight change of one training step (the rule's update and the optimiser's step, or C-EP's
    own steps) from the recipe's initial weights, on a seeded batch of MNIST-shaped random inputs,
    under ``train.precision`` ``setting`` (restored to float32 after); with the engine of the last
    relaxation."""
    from eprun import precision
    from eprun.assemble import build_network, build_rule
    from eprun.optim import build_optimizer
    from eprun.recipe import from_plain

    recipe = from_plain(recipe_dict)
    dev = torch.device(device)
    precision.apply(setting, dev)
    try:
        net = build_network(recipe, (1, 28, 28), 10, dev, dtype)
        rule = build_rule(recipe, net)
        opt = build_optimizer(recipe.optim, net.layer_groups())
        rule.attach_optimizer(opt)
        g = torch.Generator().manual_seed(data_seed)
        x = torch.rand(batch, 1, 28, 28, generator=g).to(dev, dtype)
        y = torch.randint(0, 10, (batch,), generator=g).to(dev)
        start = [p.detach().clone() for p in net.parameters()]
        opt.zero_grad(set_to_none=False)
        rule.train_step(x, y)
        if not rule.steps_optimizer:
            opt.step()
    finally:
        precision.apply("float32", dev)
    return [p.detach() - s for p, s in zip(net.parameters(), start)], net.last_relax_engine
