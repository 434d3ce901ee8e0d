"""A whole training step of the target propagation recipes as eprun takes it, against the step
before each of its CPU paths, side by side in one process:

* ``F.elu, NCHW pooling, G(·) thrice``: torch's ``F.elu`` and ``F.max_pool2d`` on the maps as they
  come, and every difference of feedbacks G_l(a) − G_l(b) as two feedbacks (L-DRL's loss with
  G_l(h_l) shared: three);
* ``exp ELU, channels-last pooling, G(·) thrice``: the ELU through exp and the pooling through a
  channels-last copy (eprun/nets/elu.py, eprun/nets/pooling.py), the differences as above;
* ``eprun``: and each difference as one application of G_l's linear part
  (``FeedforwardNet.feedback_difference``).

    python -m benchmarks.target_prop_step [--recipe ernoult2022/mnist-lenet-ldrl ...] [--threads 1] [--rounds 2]

Each recipe's net at its initial weights, its rule and optimiser (the feedback layers' warm-up
on the first batch left out), one batch of random inputs of the recipe's batch size; rounds
alternate the settings, each figure the best of 3 steps (ms). Returns them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from benchmarks.recipe_step import compare_recipes

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


def _three_feedbacks_loss(self, l, hs, indices):
    """L-DRL's loss with G_l applied three times, G_l(h_l) shared (the form before the differences)."""
    net, sigma = self.net, self.noise[l - 2]
    h_below, h, idx = hs[l - 1], hs[l], indices[l - 1]
    r = net.feedback(l, h, idx)
    eps = self._randn_like(h_below, sigma)
    with torch.no_grad():
        h_noisy, idx_noisy = net.forward_layer(l, h_below + eps)
    dr = net.feedback(l, h_noisy, idx_noisy) - r
    eta = self._randn_like(h, sigma)
    dr_eta = net.feedback(l, h + eta, idx) - r
    return (-2.0 * (eps * dr).flatten(1).sum(1) + (dr_eta * dr_eta).flatten(1).sum(1)).mean()


@contextlib.contextmanager
def feedbacks_applied_whole():
    """Differences of feedbacks as two feedbacks, L-DRL's loss as :func:`_three_feedbacks_loss`."""
    from eprun.nets.feedforward import FeedforwardNet
    from eprun.rules.dtp import DTP

    saved = FeedforwardNet.feedback_difference, DTP.feedback_loss
    FeedforwardNet.feedback_difference = lambda net, l, a, ia, b, ib: net.feedback(l, a, ia) - net.feedback(l, b, ib)
    DTP.feedback_loss = _three_feedbacks_loss
    try:
        yield
    finally:
        FeedforwardNet.feedback_difference, DTP.feedback_loss = saved


@contextlib.contextmanager
def before_both():
    with torch_elu_and_pool(), feedbacks_applied_whole():
        yield


SETTINGS = {
    "F.elu, NCHW pooling, G(·) thrice": before_both,
    "exp ELU, channels-last pooling, G(·) thrice": feedbacks_applied_whole,
    "eprun": contextlib.nullcontext,
}


def main(argv=None) -> dict:
    from eprun.catalog import resolve
    from eprun.recipe import load_recipe

    def settings_of(name):
        recipe = load_recipe(resolve(name))
        if recipe.rule.kind != "bp":
            recipe = load_recipe(resolve(name), ["rule.feedback_warmup_iterations=0"])
        return {label: (recipe, setting) for label, setting in SETTINGS.items()}

    return compare_recipes(argv, __doc__.splitlines()[0], DEFAULT, settings_of)


if __name__ == "__main__":
    main()
