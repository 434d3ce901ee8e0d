"""C-VF's nudged phase on the vector-field MLP, every weight stepped in place in the layout its
product reads (``rules/cep.py`` chooses it; the module docstring there has the rule).

The rule, plain SGD with rate η per parameter, B examples, S^m_k the B × |s^m| state of layer m
at nudged step k (S^0 = x̃, the clamped input), Δ^m_k = S^m_{k+1} − S^m_k, γ = η/(βB)::

    s_{k+1} = F(x, s_k, θ_k, β)
    W_n     ← W_n     + γ_{W_n} Δ^{n+1ᵀ}_k S^n_k          post n+1, pre n at s_k
    B_n     ← B_n     + γ_{B_n} Δ^{nᵀ}_k S^{n+1}_k        post n,   pre n+1 at s_k
    b_{n+1} ← b_{n+1} + γ_{b_{n+1}} 1ᵀ Δ^{n+1}_k

Unlike C-EP's, these increments do not telescope for n ≥ 1 (the pre-synaptic units move), so
every step writes W_n and B_n. What the step-by-step loop spends besides that write is avoidable:
its increment goes into ``.grad`` first (one product), then into the weight (a pass) and
``.grad`` is zeroed (another), and its products read W_nᵀ and B_nᵀ as transposed operands,
slower than contiguous ones (docs/performance.md). Here the phase holds W_nᵀ and B_nᵀ as
contiguous copies, Wᵗ_n and Bᵗ_n, each step's increment goes straight into them::

    Wᵗ_n += γ_{W_n} S^{nᵀ}_k Δ^{n+1}_k,   Bᵗ_n += γ_{B_n} S^{n+1ᵀ}_k Δ^n_k

and they are written back once, at the end. The step itself is
:func:`~eprun.nets.dense_relax.relax_dense_`'s, one step with those copies; the layers'
constants a·b_n + c move in place with the biases. W_0 and b_1 are not written during the phase
at all: the input is clamped, so their increments telescope and the drive a·(x̃W_0ᵀ + b_1) + c
is followed through x̃x̃ᵀ (``rules/cep.py``, "Cost")::

    drive_{k+1} = drive_k + a(γ_{W_0} x̃x̃ᵀ + γ_{b_1} 𝟙) Δ^1_k,   then W_0 += γ_{W_0} D^{1ᵀ} x̃, b_1 += γ_{b_1} 1ᵀD^1

with D^1 = S^1_K − S^1_0. The states and weights are those of the step-by-step rule in exact
arithmetic (float32 sums differ in rounding); ``tests/test_cep.py`` holds the two together. A
softmax read-out gets its exact gradient at s* and one SGD step after the first nudged step,
where the step-by-step rule applies it. ``same_update`` (tied W_n and B_nᵀ updates) is not
offered here: such a net takes the step-by-step loop with the drive followed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from eprun.nets.dense import dense_constants
from eprun.nets.dense_cep import readout_step
from eprun.nets.dense_relax import relax_dense_
from eprun.nets.parameters import parameters_in


@torch.no_grad()
def continual_nudged_phase_vf_(net, x_in: torch.Tensor, drive: torch.Tensor, free: list[torch.Tensor],
                               steps: int, beta: float, target: torch.Tensor, y: torch.Tensor,
                               rate: Callable[[nn.Parameter], float]) -> None:
    """C-VF's ``steps`` nudged steps from s* = ``free`` with plain SGD at ``rate(p)`` per parameter,
    on ``net`` (a :class:`~eprun.nets.vf_mlp.VectorFieldMLP` without ``same_update``): every
    weight, bias and read-out parameter updated in place as the step-by-step rule leaves it.

    ``x_in``: x̃ flattened; ``drive``: the net's ``input_drive`` (followed in place: it is the
    drive at the phase's last weights on return); ``target``: the one-hot labels ``y``. ``free``
    is left as it was."""
    a = net.act.scale
    weights, biases = parameters_in(net.weights), parameters_in(net.biases)
    feedback = parameters_in(net.feedback)  # feedback[i] = B_{i+1}: layer i + 2 → layer i + 1
    n_layers = len(free)
    batch = x_in.shape[0]
    gamma_w = [rate(w) / (beta * batch) for w in weights]
    gamma_b = [rate(b) / (beta * batch) for b in biases]
    gamma_f = [rate(f) / (beta * batch) for f in feedback]
    follow = torch.mm(x_in, x_in.T).mul_(a * gamma_w[0]).add_(a * gamma_b[0])  # a(γ_{W_0} x̃x̃ᵀ + γ_{b_1} 𝟙)
    up = [None] + [w.T.contiguous() for w in weights[1:]]  # Wᵗ_i: S^i @ Wᵗ_i into state i (W_0: the drive)
    down = [f.T.contiguous() for f in feedback]  # Bᵗ_{i+1}: S^{i+2} @ Bᵗ into state i

    # the constants at θ_0 (the drive, a·b_n + c, a·β·y), moved below with b_n; a constant that is
    # b_n itself (a = 1, c = 0) moves with it
    const = dense_constants(net, drive, n_layers, beta, target)
    owned = [i > 0 and const[i] is not biases[i] for i in range(n_layers)]

    state, scratch = [s.clone() for s in free], [torch.empty_like(s) for s in free]
    before = [torch.empty_like(s) for s in free]  # S^m_k
    change = [torch.empty_like(s) for s in free]  # Δ^m_k
    bias_change = [s.new_empty(s.shape[1:]) for s in free]  # 1ᵀΔ^m_k
    step_readout = readout_step(net, weights + biases + feedback, free, y, rate)
    for k in range(steps):
        for old, s in zip(before, state):
            old.copy_(s)
        relax_dense_(net, const, state, scratch, up, down, 1, beta, target)  # s_{k+1} = F(x, s_k, θ_k, β)
        for d, new, old in zip(change, state, before):
            torch.sub(new, old, out=d)  # Δ^m_k
        # θ_{k+1}: the increments with the pre-synaptic units at s_k
        for i in range(1, n_layers):
            up[i].addmm_(before[i - 1].T, change[i], alpha=gamma_w[i])  # Wᵗ_i += γ S^{iᵀ}_k Δ^{i+1}_k
            down[i - 1].addmm_(before[i].T, change[i - 1], alpha=gamma_f[i - 1])  # Bᵗ_i += γ S^{i+1ᵀ}_k Δ^i_k
            torch.sum(change[i], dim=0, out=bias_change[i])
            biases[i].add_(bias_change[i], alpha=gamma_b[i])
            if owned[i]:
                const[i].add_(bias_change[i], alpha=a * gamma_b[i])  # a·b_{n,k+1} + c
        drive.addmm_(follow, change[0])  # W_0 and b_1 followed through x̃x̃ᵀ (const[0] is the drive)
        if k == 0:
            step_readout()
    moved = state[0].sub(free[0])  # D^1 = S^1_K − S^1_0
    weights[0].addmm_(moved.T, x_in, alpha=gamma_w[0])
    biases[0].add_(moved.sum(dim=0), alpha=gamma_b[0])
    for i in range(1, n_layers):
        weights[i].copy_(up[i].T)
        feedback[i - 1].copy_(down[i - 1].T)
