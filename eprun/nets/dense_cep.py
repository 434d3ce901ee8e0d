"""C-EP's nudged phase on the prototypical dense chain, every weight held as θ* plus its
increments in factored form (``rules/cep.py`` chooses it; the module docstring there has the rule).

The rule, plain SGD with rate η per parameter, B examples, S^m_k the B × |s^m| state of layer m
at nudged step k (S^0 = x̃, the clamped input), S^m_0 = s*::

    s_{k+1} = F(x, s_k, θ_k, β)
    W_n ← W_n + (η_n/β)·(1/B)(S^{n+1ᵀ}_{k+1} S^n_{k+1} − S^{n+1ᵀ}_k S^n_k)       ∂Φ/∂W_n = s^{n+1} s^{nᵀ}
    b_n ← b_n + (η'_n/β)·(1/B) 1ᵀ(S^n_{k+1} − S^n_k)

Φ = Σ_n s^{n+1}·(W_n s^n + b_{n+1}) is linear in θ, so ∂Φ/∂θ does not depend on θ and the
increments telescope whatever θ_k is: with γ_n = η_n/(βB), γ'_n = η'_n/(βB),

    W_{n,k} = W_n* + γ_n (S^{n+1ᵀ}_k S^n_k − S^{n+1ᵀ}_0 S^n_0),   b_{n,k} = b_n* + γ'_n 1ᵀ(S^n_k − S^n_0)

A step's products with θ_k then split into the products with θ* (fixed for the whole phase)
and B × B matrices. The increments are written with the states' changes D^m = S^m_k − S^m_0,
not as the difference of the two large products S^{n+1ᵀ}_k S^n_k and S^{n+1ᵀ}_0 S^n_0, whose
cancellation would cost float32 digits::

    S^{n+1ᵀ}_k S^n_k − S^{n+1ᵀ}_0 S^n_0 = D^{n+1ᵀ} S^n_k + S^{n+1ᵀ}_0 D^n

With E^m = S^m_k D^{mᵀ}, C^m = S^m_k S^{mᵀ}_0 (E^0 = 0, C^0 = x̃x̃ᵀ: the input is clamped) and
𝟙 the B × B matrix of ones, the pre-activation of layer n at step k is::

    S^{n−1}_k W_{n−1,k}ᵀ + S^{n+1}_k W_{n,k} + b_{n,k}
      = S^{n−1}_k W_{n−1}*ᵀ + S^{n+1}_k W_n* + b_n*                                  (θ*'s step)
      + [γ_{n−1} E^{n−1} + γ_n E^{n+1}] S^n_k + [γ_{n−1} C^{n−1} + γ_n C^{n+1} + γ'_n 𝟙] D^n

(no n+1 terms at the top layer; S^0 W_0*ᵀ + b_1* is the input drive, computed once per
batch). A step costs the products with W* of the free phase's step plus B × B work, where
writing θ_k out costs, per weight, an outer product of its size to form the increment and
passes over it to apply it. The weights are written once, at the end::

    W_n += γ_n (D^{n+1ᵀ} S^n_K + S^{n+1ᵀ}_0 D^n),   b_n += γ'_n 1ᵀ D^n        (D at k = K)

The states and weights are those of the step-by-step rule in exact arithmetic (float32 sums
differ in rounding); ``tests/test_cep.py`` holds the two together in float64 at large rates
and, against float64, in float32. A softmax read-out (outside Φ) gets its exact gradient at
s* and one SGD step after the first nudged step, where the step-by-step rule applies it.

The step itself is :func:`~eprun.nets.dense_relax.relax_dense_`'s, one step with θ*'s weights:
the increments so far enter through the layers' constants, c_n + a·(P S^n_k + Q D^n) in place of
θ*'s c_n (the drive, a·b_n* + c, a·β·y). Layout: per layer a (3B × |s^m|) buffer holding
[S^m_k ; D^m ; S^m_0]: the state is its first block (which the step writes), one product of
S^m_k with its last two blocks gives [E^m | C^m], and one product of a coefficient [P | Q] with
its first two gives P S^m_k + Q D^m.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from eprun.nets.dense import dense_constants
from eprun.nets.dense_relax import relax_dense_
from eprun.nets.parameters import grad_of, parameters_in


def readout_step(net, chain: list[nn.Parameter], free: list[torch.Tensor], y: torch.Tensor,
                 rate: Callable[[nn.Parameter], float]) -> Callable[[], None]:
    """The read-out outside the dynamics (softmax; none with MSE) in a C-EP nudged phase: its exact
    loss gradient at s* into ``.grad`` now, and the SGD step θ_1 = θ_0 − η·∂ℓ/∂θ(s*) that applies
    it, to be called after the first nudged step (which the step-by-step rule takes with the
    read-out at θ_0). ``chain``: the parameters of the dynamics; every other one is the read-out's."""
    readout = [p for p in net.parameters() if all(p is not q for q in chain)]
    for p in readout:
        grad_of(p).zero_()
    if readout:
        net.accumulate_readout_grad_(free, y)

    def step() -> None:
        for p in readout:
            p.add_(p.grad, alpha=-rate(p))
            p.grad.zero_()

    return step


@torch.no_grad()
def continual_nudged_phase_dense_(net, x_in: torch.Tensor, drive: torch.Tensor, free: list[torch.Tensor],
                                  steps: int, beta: float, target: torch.Tensor, y: torch.Tensor,
                                  rate: Callable[[nn.Parameter], float]) -> None:
    """C-EP's ``steps`` nudged steps from s* = ``free`` with plain SGD at ``rate(p)`` per parameter,
    on ``net`` (a :class:`~eprun.nets.mlp.PrototypicalMLP`): every weight, bias and read-out
    parameter updated in place as the step-by-step rule leaves it (module docstring).

    ``x_in``: x̃ flattened; ``drive``: a·(x̃W_0*ᵀ + b_1*) + c (the net's ``input_drive``);
    ``target``: the one-hot labels ``y``. ``free`` is left as it was."""
    a = net.act.scale
    weights, biases = parameters_in(net.weights), parameters_in(net.biases)
    n_layers = len(free)
    batch = x_in.shape[0]
    gamma = [rate(w) / (beta * batch) for w in weights]  # γ_n of W_n: s^n → s^{n+1}
    gamma_b = [rate(b) / (beta * batch) for b in biases]  # γ'_{n+1} of b_{n+1} (its layer's group)
    zeros_ones = torch.cat([x_in.new_zeros(batch, batch), x_in.new_ones(batch, batch)], dim=1)  # [0 | 𝟙]
    coef_in = torch.mm(x_in, x_in.T).mul_(gamma[0]).add_(1.0, alpha=gamma_b[0])  # γ_0 C⁰ + γ'_1 𝟙 (E⁰ = 0)
    coef_in = torch.cat([torch.zeros_like(coef_in), coef_in], dim=1)
    bias_coef = [zeros_ones * g for g in gamma_b]  # [0 | γ'_n 𝟙]
    const = dense_constants(net, drive, n_layers, beta, target)  # θ*'s: the drive, a·b_n* + c, a·β·y
    # W_n*ᵀ laid out for S^n_k W_n*ᵀ: a product with a transposed operand is slower (docs/performance.md)
    bottom_up, top_down = [None] + [w.T.contiguous() for w in weights[1:]], weights[1:]

    blocks = [torch.cat([s, torch.zeros_like(s), s]) for s in free]  # [S^m_k ; D^m ; S^m_0], k = 0
    state = [z[:batch] for z in blocks]  # S^m_k
    moved = [z[batch:2 * batch] for z in blocks]  # D^m
    first = [z[2 * batch:] for z in blocks]  # S^m_0
    scratch = [torch.empty_like(s) for s in free]
    grams = [x_in.new_empty(batch, 2 * batch) for _ in free]  # [E^m | C^m]
    coefs = [x_in.new_empty(batch, 2 * batch) for _ in free]
    shifted = [x_in.new_empty(s.shape) for s in free]  # the constants with the increments so far
    step_readout = readout_step(net, weights + biases, free, y, rate)
    for k in range(steps):
        for s, z, g in zip(state, blocks, grams):
            torch.mm(s, z[batch:].T, out=g)  # S^m_k [D^m ; S^m_0]ᵀ = [E^m | C^m]
        for i in range(n_layers):  # layer n = i + 1: below it W_i (γ[i]) and b_{i+1} (γ_b[i]), above it W_{i+1}
            if i == 0:  # γ_0[0|C⁰] + [0 | γ'_1 𝟙]
                coef = coef_in if n_layers == 1 else torch.add(coef_in, grams[1], alpha=gamma[1], out=coefs[0])
            else:  # γ_{n−1}[E|C]^{n−1} + [0 | γ'_n 𝟙]
                coef = torch.add(bias_coef[i], grams[i - 1], alpha=gamma[i], out=coefs[i])
                if i + 1 < n_layers:
                    coef.add_(grams[i + 1], alpha=gamma[i + 1])  # + γ_n[E|C]^{n+1}
            torch.addmm(const[i], coef, blocks[i][:2 * batch], alpha=a, out=shifted[i])  # c_n + a·(P S^n_k + Q D^n)
        relax_dense_(net, shifted, state, scratch, bottom_up, top_down, 1, beta, target)  # s_{k+1}, θ*'s products
        for s, d, s0 in zip(state, moved, first):
            torch.sub(s, s0, out=d)  # D^m at k + 1
        if k == 0:
            step_readout()
    # the K increments at once: W_n += γ_n (D^{n+1ᵀ} S^n_K + S^{n+1ᵀ}_0 D^n), b_n += γ'_n 1ᵀD^n
    weights[0].addmm_(moved[0].T, x_in, alpha=gamma[0])
    for n in range(1, n_layers):
        weights[n].addmm_(moved[n].T, state[n - 1], alpha=gamma[n])
        weights[n].addmm_(first[n].T, moved[n - 1], alpha=gamma[n])
    for n in range(n_layers):
        biases[n].add_(moved[n].sum(dim=0), alpha=gamma_b[n])
