"""Equilibrium Propagation with continual weight updates: C-EP and C-VF (Ernoult et al. 2020).

arXiv:2005.04168. The free phase is EP's: T steps from s_0 = 0 with fixed θ give s*. In the
nudged phase the parameters change at *every* step, with information local in space and
time, and the dynamics always use the current parameters. Starting from s_0 = s*, θ_0 = θ,
for k = 0 … K−1::

    s_{k+1} = F(x, s_k, θ_k, β)                                         one step, nudged
    θ_{k+1} = θ_k + (η/β) (∂Φ/∂θ(x, s_{k+1}) − ∂Φ/∂θ(x, s_k))            C-EP

For a vector-field net (``model.kind: vf_mlp``, no Φ, forward weights W_n: s^n → s^{n+1},
backward weights B_n: s^{n+1} → s^n) each synapse moves with the change of its post-synaptic
unit times its pre-synaptic unit at s_k: C-VF, as the authors' code computes it::

    W_n     ← W_n     + (η/β) (s^{n+1}_{k+1} − s^{n+1}_k) s^{nᵀ}_k        post n+1, pre n
    B_n     ← B_n     + (η/β) (s^n_{k+1}     − s^n_k)     s^{n+1ᵀ}_k      post n,   pre n+1
    b_{n+1} ← b_{n+1} + (η/β) (s^{n+1}_{k+1} − s^{n+1}_k)

(B_n's increment is its own outer product, not the transpose of W_n's; their sum is C-EP's
increment of a tied weight less (η/β) Δs^{n+1} Δs^{nᵀ}.) Both rules are what the network's
``accumulate_dphi_dtheta_difference_(x, s_k, s_{k+1}, 1/β)`` writes, negated, into ``.grad``.

Small η. Theorem 1 of the paper: as η → 0 and β → 0 the total update follows BPTT's gradient;
as η → 0 alone the C-EP total is EP's update with learning rate η (not K·η: the increments
telescope, Σ_k ∂Φ/∂θ(s_{k+1}) − ∂Φ/∂θ(s_k) = ∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)). For C-VF the sum
telescopes exactly for W_0 (its pre-synaptic unit, the input, is clamped) and the biases, and
to O(β) for W_n (n ≥ 1) and B_n, whose pre-synaptic units move during the nudged phase: the
η → 0 total is then the VF update of :mod:`eprun.nets.vf_mlp` up to O(β).

Finite η: the continual loop. The dynamics use θ_k, so each increment feeds back into the
next state change. For the input layer, ΔW_0 = (η_0/β)·batch-mean(Δs¹ xᵀ) and Δb_1 move the
drive W_0 x_b + b_1 of example b by (η_0/β)·mean_c[(x_c·x_b + 1) Δs¹_c], so the next Δs¹ picks
up σ' times that: a loop gain of about g = (η_0/β)·σ'·(⟨x_c·x_b⟩ + 1) per step. Once |g| nears
1 the loop compounds over the K steps: the β > 0 updates grow to many times their small-η
limit, and the β < 0 ones (``random-sign``) oscillate and can point against it. What that
means for the published C-VF learning rates is measured in ``recipes/README.md`` (C-EP rows).

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

from eprun import stopping
from eprun.limits import MAX_STEPS, magnitude, within
from eprun.rules.base import Relaxation, RuleConfig
from eprun.rules.ep import EP

Estimator = Literal["one-sided", "positive", "negative", "random-sign"]


@dataclass
class CEPConfig(RuleConfig):
    """``rule:`` section for ``kind: cep``."""

    kind: str = "cep"
    T: int = 30
    K: int = 10
    beta: float = 0.1
    estimator: Estimator = "one-sided"
    sign_probability: float = 0.5

    def check(self):
        yield from within("T", self.T, 1, MAX_STEPS)  # the free phase's steps
        yield from within("K", self.K, 1, MAX_STEPS)  # the nudged phase's
        if self.beta == 0.0:
            yield "beta", "must be non-zero: C-EP divides by β"
        yield from magnitude("beta", self.beta)
        if not 0.0 <= self.sign_probability <= 1.0:
            yield "sign_probability", f"a probability in [0, 1], got {self.sign_probability}"

    def relaxation(self) -> Relaxation:
        return Relaxation(self.T, self.K, self.beta, self.estimator)

    def label(self) -> str:
        return f"{self.kind}/{self.estimator}"

    def schedule(self) -> dict:
        """The papers' schedule only: every layer from s_t, a fixed number of steps."""
        return {}


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

    def _count(self, phase: str) -> None:
        """C-EP's phases always take T and K steps: nothing to count."""

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
            stopping.check()
            opt.zero_grad(set_to_none=False)
            if k == 0:
                net.accumulate_readout_grad_(free, y)  # read-out outside Φ: exact gradient at s*, once
            for new, old in zip(nxt, cur):
                new.copy_(old)
            # s_{k+1} = F(x, s_k, θ_k, β): the drive W_0 x + b_1 uses the current θ_k
            net.relax(net.input_drive(x), nxt, 1, beta, target)
            # .grad = −Δθ_k/η = (1/β)(∂Φ/∂θ(s_k) − ∂Φ/∂θ(s_{k+1}))     C-EP
            #   VF nets (C-VF): W_n.grad = (1/β)(s^{n+1}_k − s^{n+1}_{k+1}) s^{nᵀ}_k,
            #   B_n.grad = (1/β)(s^n_k − s^n_{k+1}) s^{n+1ᵀ}_k, b_{n+1}.grad = (1/β)(s^{n+1}_k − s^{n+1}_{k+1})
            net.accumulate_dphi_dtheta_difference_(x, cur, nxt, 1.0 / beta)
            opt.step()  # θ_{k+1} = θ_k − η·grad = θ_k + Δθ_k with SGD (η per layer group)
            cur, nxt = nxt, cur
        opt.zero_grad(set_to_none=False)
        return logits, loss
