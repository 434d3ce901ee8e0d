"""What each rule is timed against: its step in the papers' formulation — autograd of Φ
(:mod:`eprun.reference.autograd_ep`), or on the vector-field MLP, which has no Φ, the authors'
out-of-place steps (:mod:`eprun.reference.vector_field`) — with the recipe's optimiser in torch's
default implementation, as the reference code builds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from eprun.reference import for_net


def plain_optimizer(cfg, layer_groups) -> torch.optim.Optimizer:
    """The recipe's optimiser in torch's default implementation."""
    n = len(layer_groups)
    lrs = cfg.lr if isinstance(cfg.lr, list) else [cfg.lr] * n
    decays = cfg.weight_decay if isinstance(cfg.weight_decay, list) else [cfg.weight_decay] * n
    groups = [{"params": p, "lr": lr, "weight_decay": wd} for p, lr, wd in zip(layer_groups, lrs, decays)]
    if cfg.kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.kind == "adam":
        return torch.optim.Adam(groups, lr=lrs[0], betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.kind == "adamw":
        return torch.optim.AdamW(groups, lr=lrs[0], betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optimiser {cfg.kind!r}")


class NoStep:
    """An optimiser that applies nothing: the baseline's update stays in ``.grad`` to be compared."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def _ep(net, cfg, optimizer):
    reference = for_net(net)

    def run(x, y):
        reference.ep_train_step(net, x, y, cfg.T, cfg.K, cfg.beta, cfg.estimator)
        optimizer.step()
    return run


def _bptt(net, cfg, optimizer):
    reference = for_net(net)

    def run(x, y):
        reference.bptt_train_step(net, x, y, cfg.T)
        optimizer.step()
    return run


def _cep(net, cfg, optimizer):
    reference = for_net(net)

    def run(x, y):
        reference.cep_train_step(net, x, y, cfg.T, cfg.K, cfg.beta, optimizer, cfg.estimator)
    return run


def _free_phase_prediction(net, cfg):
    reference = for_net(net)
    return lambda x: reference.predict(net, x, cfg.T)


def _bp_on_same_net(net, cfg, optimizer):
    """Target propagation's reference point: one BP step (forward, cross-entropy, backward) on the same net."""
    def run(x, y):
        with torch.enable_grad():
            net.loss(net.feedforward(x), y).mean().backward()
        optimizer.step()
    return run


def _forward_prediction(net, cfg):
    def predict(x):
        with torch.no_grad():
            return net.feedforward(x)[-1]
    return predict


@dataclass(frozen=True)
class Baseline:
    """A rule's baseline: ``train(net, rule config, optimiser)`` gives the training step fn(x, y),
    optimiser step included (with :class:`NoStep` its update stays in ``.grad``);
    ``predict(net, rule config)`` gives fn(x) → logits, the evaluation."""

    train: Callable
    predict: Callable
    same_update: bool = True  # the baseline computes eprun's update (checked); False: a different method
    needs_reference: bool = True  # it runs the net's reference formulation (eprun.reference.for_net): one must exist


#: rule.kind → its baseline. A rule without an entry here cannot be benchmarked.
BASELINES: dict[str, Baseline] = {
    "ep": Baseline(_ep, _free_phase_prediction),
    "bptt": Baseline(_bptt, _free_phase_prediction),
    "cep": Baseline(_cep, _free_phase_prediction),
    "dtp": Baseline(_bp_on_same_net, _forward_prediction, same_update=False, needs_reference=False),
}
