"""Equilibrium Propagation with continual weight updates: C-EP and C-VF (Ernoult et al. 2020).

arXiv:2005.04168. The free phase is EP's: T steps from s_0 = 0 with fixed θ give s*. In the
nudged phase the parameters change at *every* step, with information local in space and
time, and the dynamics always use the current parameters. Starting from s_0 = s*, θ_0 = θ,
for k = 0 … K−1::

    s_{k+1} = F(x, s_k, θ_k, β)                                         one step, nudged
    θ_{k+1} = θ_k + (η/β) (∂Φ/∂θ(x, s_{k+1}) − ∂Φ/∂θ(x, s_k))            C-EP

For a vector-field net (``model.kind: vf_mlp``, no Φ) the increment is the VF one,
(η/β)(s^{post}_{k+1} − s^{post}_k) s^{pre ᵀ}_k per weight: C-VF. Both are what the network's
``accumulate_dphi_dtheta_difference_(x, s_k, s_{k+1}, 1/β)`` writes, negated, into ``.grad``.
Theorem 1 of the paper: as η → 0 and β → 0 the total update follows BPTT's gradient; as η → 0
alone the C-EP total is EP's update (the increments telescope).

Optimisers. Each increment is applied by the recipe's own ``torch.optim`` optimiser, so its
per-layer learning rates (η per layer) and schedule hold: at each nudged step the rule zeroes
``.grad``, writes −Δθ_k/η into it and calls ``optimizer.step()``. The rule therefore holds the
optimiser (:meth:`CEP.attach_optimizer`) and steps it K times per batch; ``steps_optimizer``
tells the runner not to step it again. With plain SGD (the paper's setting) the step is
exactly θ_{k+1} = θ_k − η·grad. With momentum, Adam or weight decay every nudged step is a
full optimiser step (K per batch: K decays, K moment updates) — well defined, but not the
paper's rule. A softmax read-out (outside Φ) gets its exact gradient at s* once per batch,
in the first nudged step.

Cost. θ changes at every step, so nothing computed from θ can be reused across steps: the
input drive a·(W_0 x + b_1) + c, which EP computes once per batch, is recomputed at every
nudged step (a batch × |x| × |s¹| product, the largest of a step), and the ∂Φ/∂θ increment
(outer products the size of every weight) is taken K times instead of once. That is inherent
to C-EP: it is what "continual" costs in a simulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from eprun.rules.ep import EP

Estimator = Literal["one-sided", "positive", "negative", "random-sign"]


@dataclass
class CEPConfig:
    """``rule:`` section for ``kind: cep``."""

    kind: str = "cep"
    T: int = 30
    K: int = 10
    beta: float = 0.1
    estimator: Estimator = "one-sided"
    sign_probability: float = 0.5

    def check(self):
        if self.T < 1:
            yield "T", f"the free phase needs at least 1 step, got {self.T}"
        if self.K < 1:
            yield "K", f"the nudged phase needs at least 1 step, got {self.K}"
        if self.beta == 0.0:
            yield "beta", "must be non-zero: C-EP divides by β"
        if not 0.0 <= self.sign_probability <= 1.0:
            yield "sign_probability", f"a probability in [0, 1], got {self.sign_probability}"


class CEP(EP):
    """C-EP / C-VF on any network with ``input_drive``, ``relax`` and ``accumulate_dphi_dtheta_difference_``.

    Free phase, evaluation, β-sign draws (``random-sign``: one sign per mini-batch from the
    rule's seeded generator) and ``state_dict`` are EP's.
    """

    Config = CEPConfig
    steps_optimizer = True  # train_step applies the updates itself: the runner must not step again

    def __init__(self, cfg: CEPConfig, net, generator: torch.Generator):
        super().__init__(cfg, net, generator)
        self.optimizer: torch.optim.Optimizer | None = None

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser that applies each nudged step's increment (built on ``net.layer_groups()``)."""
        self.optimizer = optimizer

    @torch.no_grad()
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Free phase, then K nudged steps each followed by an optimiser step.

        Returns the free-phase logits and per-example loss (as EP does). On return every
        ``.grad`` of the optimiser's parameters is zero: the updates are already applied.
        """
        if self.optimizer is None:
            raise RuntimeError("C-EP applies its updates during the nudged phase and needs the optimiser: "
                               "call rule.attach_optimizer(optimizer) before train_step")
        net, cfg, opt = self.net, self.cfg, self.optimizer
        target = net.target(y, x)
        free = self.free_phase(net.input_drive(x))  # s*, with θ fixed
        logits, loss = net.logits(free).clone(), net.loss(free, y)
        beta = self._beta()
        cur, nxt = free, [s.clone() for s in free]  # s_k and s_{k+1}, swapped each step
        for k in range(cfg.K):
            opt.zero_grad(set_to_none=False)
            if k == 0:
                net.accumulate_readout_grad_(free, y)  # read-out outside Φ: exact gradient at s*, once
            for new, old in zip(nxt, cur):
                new.copy_(old)
            # s_{k+1} = F(x, s_k, θ_k, β): the drive W_0 x + b_1 uses the current θ_k
            net.relax(net.input_drive(x), nxt, 1, beta, target)
            # .grad = −Δθ_k/η = (1/β)(∂Φ/∂θ(s_k) − ∂Φ/∂θ(s_{k+1}))   [VF nets: their local increment]
            net.accumulate_dphi_dtheta_difference_(x, cur, nxt, 1.0 / beta)
            opt.step()  # θ_{k+1} = θ_k + (η/β)(∂Φ/∂θ(s_{k+1}) − ∂Φ/∂θ(s_k)) with SGD
            cur, nxt = nxt, cur
        opt.zero_grad(set_to_none=False)
        return logits, loss
