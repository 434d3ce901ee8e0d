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

Cost, and the input layer followed through x̃x̃ᵀ. θ changes at every step, so the input drive
a·(x̃ W_0ᵀ + b_1) + c, which EP computes once per batch, changes at every nudged step, and so
does W_0, the largest weight. Written out, each step would cost a batch × |x| × |s¹| product
for the drive and an outer product of W_0's size for its increment. Neither is needed where
the increments are plain SGD steps (no momentum, no weight decay) on one process and the net's
drive is affine in (W_0, b_1) (``linear_input_drive``). With Δ_k = s¹_k − s¹_{k+1}, B the batch
and η_W, η_b the learning rates of W_0 and b_1, the step's increments are
W_0 −= (η_W/(βB)) Δ_kᵀx̃ and b_1 −= (η_b/(βB)) Σ_b Δ_k, so the drive moves by::

    drive_{k+1} = drive_k − (a/(βB)) (η_W x̃x̃ᵀ + η_b 11ᵀ) Δ_k         (a B × B matrix, once per batch)

and since x̃ is clamped the K increments of W_0 telescope, Σ_k Δ_k = s¹* − s¹_K::

    W_0 −= (η_W/(βB)) (s¹* − s¹_K)ᵀ x̃,   b_1 −= (η_b/(βB)) Σ_b (s¹* − s¹_K)      (once, at the end)

The states and the final weights are those of the step-by-step loop in exact arithmetic (the
float32 sums differ in rounding; ``tests/test_cep.py`` holds the paths together). The other
layers are still updated at every step, by the SGD step written out (θ −= η·grad).

Every layer, where Φ is linear in θ (the prototypical MLP: ∂Φ/∂W_n = s^{n+1}s^{nᵀ} whatever
θ is). Then every weight's increments telescope, not only W_0's, so θ_k = θ* + γ(∂Φ/∂θ(s_k) −
∂Φ/∂θ(s*)) at every step and a step's products with θ_k split into the products with θ* and
B × B Gram matrices of the states: :meth:`~eprun.nets.base.EPNetwork.continual_nudged_phase_`,
:mod:`eprun.nets.dense_cep` for the maths. No weight is written until the end. A vector-field
net's W_n and B_n (n ≥ 1) do not telescope (their pre-synaptic units move), so they are written
at every step; its own phase (:mod:`eprun.nets.vf_cep`) writes each increment straight into
contiguous copies of W_nᵀ and B_nᵀ, the layout the step's products read, instead of through
``.grad``. Where the net offers no such phase (bf16 products, tied updates) the input-followed
path runs. Anything else — momentum, Adam, weight decay, or a data-parallel run, whose
drive also moves with the other ranks' examples — takes the loop that recomputes the drive and
steps every weight at every step. The paths' speeds: docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from eprun import stopping
from eprun.limits import MAX_STEPS, magnitude, within
from eprun.nets.parameters import grad_of
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

    def capture_obstacle(self) -> None:
        """Always T and K steps, and the optimiser's steps are device work: capturable."""
        return None

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
        drive = net.input_drive(x)
        free = self.free_phase(drive)  # s*, with θ fixed
        logits, loss = net.logits(free).clone(), net.loss(free, y)
        beta = self._batch_beta()
        if self.follows_input_drive():
            # the net's own phase where it offers one (docstring, "Every layer"), else W_0 and b_1 followed
            if net.continual_nudged_phase_(x, drive, free, cfg.K, beta, target, y, self._learning_rate):
                for group in opt.param_groups:
                    for p in group["params"]:
                        grad_of(p).zero_()  # the promise below: every .grad zero on return
            else:
                self._nudged_phase_following_drive(x, y, target, drive, free, beta)
            return logits, loss
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

    def follows_input_drive(self) -> bool:
        """Whether the nudged phase follows the input drive through x̃x̃ᵀ and applies W_0's and b_1's
        K increments at once (module docstring, "Cost"): the net's drive is affine in (W_0, b_1),
        and the optimiser is this process's own plain SGD (no momentum, weight decay, Nesterov)."""
        opt = self.optimizer
        if not self.net.linear_input_drive or not isinstance(opt, torch.optim.SGD):
            return False
        return all(g.get("momentum", 0.0) == 0.0 and g.get("weight_decay", 0.0) == 0.0 and not g.get("nesterov")
                   and not g.get("maximize") for g in opt.param_groups)

    def _learning_rate(self, p: torch.nn.Parameter) -> float:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return float(group["lr"])
        raise ValueError("a parameter of the net is in none of the optimiser's groups")

    def _nudged_phase_following_drive(self, x, y, target, drive, free, beta) -> None:
        """The K nudged steps of :meth:`train_step` with the input drive followed through x̃x̃ᵀ:

            s_{k+1} = F(x, s_k, θ_k, β)                      with drive_k = a·(x̃ W_{0,k}ᵀ + b_{1,k}) + c
            θ_{k+1} = θ_k − η·grad  for every parameter but W_0, b_1  (plain SGD, η per layer group)
            drive_{k+1} = drive_k − M Δ_k,  M = (a/(βB))(η_W x̃x̃ᵀ + η_b 11ᵀ),  Δ_k = s¹_k − s¹_{k+1}

        then W_0 −= (η_W/(βB))(s¹* − s¹_K)ᵀx̃ and b_1 −= (η_b/(βB))Σ_b(s¹* − s¹_K). The SGD steps
        are written out (what :meth:`follows_input_drive` admits is exactly θ −= η·grad), so that
        W_0 is not swept K times by steps that leave it unchanged."""
        net, opt = self.net, self.optimizer
        x_in, w0, b1, a = net.input_layer(x)
        eta_w, eta_b = self._learning_rate(w0), self._learning_rate(b1)
        c = 1.0 / (beta * x_in.shape[0])
        follow = torch.mm(x_in, x_in.T).mul_(a * c * eta_w).add_(a * c * eta_b)
        stepped = [(float(group["lr"]), [p for p in group["params"] if p is not w0 and p is not b1])
                   for group in opt.param_groups]
        opt.zero_grad(set_to_none=False)
        for p in (w0, b1):
            grad_of(p)  # left zero (train_step's promise: every .grad zero on return)
        first = free[0].clone()  # s¹*
        delta = torch.empty_like(first)  # Δ_k, one buffer for the K steps
        cur, nxt = free, [s.clone() for s in free]
        for k in range(self.cfg.K):
            stopping.check()
            if k == 0:
                net.accumulate_readout_grad_(free, y)
            for new, old in zip(nxt, cur):
                new.copy_(old)
            net.relax(drive, nxt, 1, beta, target)  # s_{k+1} = F(x, s_k, θ_k, β)
            net.accumulate_dphi_dtheta_difference_(x, cur, nxt, 1.0 / beta, skip_input_layer=True)
            for lr, params in stepped:  # θ_{k+1} = θ_k − η·grad
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
                        p.grad.zero_()
            drive.addmm_(follow, torch.sub(cur[0], nxt[0], out=delta), alpha=-1.0)  # drive_{k+1} = drive_k − M Δ_k
            cur, nxt = nxt, cur
        diff = first.sub_(cur[0])  # s¹* − s¹_K = Σ_k Δ_k
        w0.addmm_(diff.T, x_in, alpha=-eta_w * c)
        b1.add_(diff.sum(dim=0), alpha=-eta_b * c)
