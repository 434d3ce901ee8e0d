"""EP, BPTT and C-EP by autograd of Φ, formulated as the public reference code of the papers does it.

At every step of every phase the primitive function Φ (with −βℓ when nudged) is rebuilt from
the parameters θ and the input x — so the input drive W_0 x + b_1, or the first convolution
of x, is recomputed at every step — and differentiated by autograd with respect to the states::

    prototypical nets (mlp, conv):  s_{t+1} = σ(∂(Φ − βℓ)/∂s (x, s_t, θ))
    energy-based net (energy_mlp):  s_{t+1} = ε·∂(Φ − βℓ)/∂s (x, s_t, θ), then clamped to [0, 1] if ``clamp``

(for the energy-based net Φ = Φ_ε/ε, so ε·∂Φ/∂s = (1 − ε)s + ε ρ'(s) ⊙ (W ρ(s) + Wᵀ ρ(s) + b [+ L ρ(s)])
and ε·∂(−βℓ)/∂s^N = εβ(y − s^N): the dynamics of :mod:`eprun.nets.energy_mlp`). The updates::

    EP      −Δθ = ∂/∂θ [−(Φ(x, s^β, θ) − Φ(x, s*, θ))/β]            autograd, states detached
            symmetric estimator: −(Φ(s^β) − Φ(s^{−β}))/(2β)
    BPTT    ∂ℓ(s_T, y)/∂θ by autograd through the T steps above (each ∂Φ/∂s taken with create_graph)
    C-EP    at every nudged step k: s_{k+1} from s_k with the current θ_k, then the optimiser
            applies the autograd gradient of −(Φ(x, s_{k+1}, θ_k) − Φ(x, s_k, θ_k))/β

A softmax read-out (outside Φ) gets the autograd gradient of its loss at s* (once per batch).
These reuse the parameters of an eprun network (``mlp``, ``energy_mlp``, ``conv``) but none of
its code: Φ of every net is written here, so a faster eprun helper never makes the reference
faster, and a bug in a net's closed forms does not reach it. The tests hold eprun's updates
equal to these; ``eprun bench`` times eprun against them, side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eprun.nets.conv import ConvNet
from eprun.nets.energy_mlp import EnergyMLP
from eprun.nets.mlp import PrototypicalMLP


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


# --------------------------------------------------------------------------- Φ, rebuilt from θ and x


def _prototypical_mlp_phi(net, x, state):
    """Φ = Σ_n s^{n+1}·(W_n s^n + b_{n+1}), per example."""
    layers = [_flat(x)] + list(state)
    total = 0.0
    for n, (w, b) in enumerate(zip(net.weights, net.biases)):
        total = total + ((layers[n] @ w.T + b) * layers[n + 1]).sum(dim=1)
    return total


class _InclusiveHardSigmoid(torch.autograd.Function):
    """ρ(s) = clamp(a·s + c, 0, 1) whose derivative a·1[0 ≤ a·s + c ≤ 1] counts the boundaries in,
    the energy-based net's convention (autograd of ``clamp`` gives 0 there, so a state at 0
    would never move)."""

    @staticmethod
    def forward(ctx, s, a, c):
        ctx.save_for_backward(s)
        ctx.a, ctx.c = a, c
        return (s * a + c).clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        z = s * ctx.a + ctx.c
        return grad * (ctx.a * ((z >= 0) & (z <= 1)).to(grad.dtype)), None, None


def _rho(net):
    act = net.act
    if act.name in ("sigmoid", "tanh"):
        return act
    return lambda s: _InclusiveHardSigmoid.apply(s, act.scale, act.shift)


def _energy_mlp_phi(net, x, state):
    """Φ = Φ_ε/ε = ½(1/ε − 1)‖s‖² + Σ_n ρ(s^{n+1})·(W_n ρ(s^n) + b_{n+1}) [+ Σ_n ½ ρ(s^n)ᵀ L_n ρ(s^n)],
    ρ(s⁰) = ρ(x) if ``input_rho`` else x; L_n used as sym(L_n) with a zero diagonal."""
    rho = _rho(net)
    x = _flat(x)
    r = [rho(x) if net.cfg.input_rho else x] + [rho(s) for s in state]
    total = 0.5 * (1.0 / net.eps - 1.0) * sum((s * s).sum(dim=1) for s in state)
    for n, (w, b) in enumerate(zip(net.weights, net.biases)):
        total = total + ((r[n] @ w.T + b) * r[n + 1]).sum(dim=1)
    for i, lat in enumerate(net.laterals):
        sym = 0.5 * (lat + lat.T)
        sym = sym - torch.diag_embed(torch.diagonal(sym))
        total = total + 0.5 * ((r[i + 1] @ sym) * r[i + 1]).sum(dim=1)
    return total


def _conv_phi(net, x, state):
    """Φ = Σ s^{n+1}·P_n(W_n ⋆ s^n + b_{n+1}) over the conv layers + Σ s^{n+1}·(W_n s^n + b_{n+1})
    over the dense ones, per example: every convolution (the first one of x included) and
    pooling rebuilt, with torch's own pooling as the reference code has it."""
    layers = [x] + list(state)
    total = 0.0
    for n, (w, b) in enumerate(zip(net.weights, net.biases)):
        if n < net.n_conv:
            z = F.conv2d(layers[n], w, b, net.strides[n], net.paddings[n])
            if net.pools[n] == "max":
                z = F.max_pool2d(z, net.pool_size, net.pool_size)
            elif net.pools[n] == "avg":
                z = F.avg_pool2d(z, net.pool_size, net.pool_size)
            total = total + (layers[n + 1] * z).sum(dim=(1, 2, 3))
        else:
            total = total + (layers[n + 1] * (_flat(layers[n]) @ w.T + b)).sum(dim=1)
    return total


_PHI = {PrototypicalMLP: _prototypical_mlp_phi, EnergyMLP: _energy_mlp_phi, ConvNet: _conv_phi}


def supports(net) -> bool:
    """Whether a baseline exists for this network (``mlp``, ``energy_mlp``, ``conv``; not the
    vector-field nets, which have no Φ)."""
    return type(net) in _PHI


def phi(net, x, state):
    """Φ(x, s, θ), one value per example, rebuilt from the parameters and the input."""
    try:
        fn = _PHI[type(net)]
    except KeyError:
        raise ValueError(f"no autograd-of-Φ baseline for {type(net).__name__} "
                         f"(supported: {', '.join(c.__name__ for c in _PHI)})") from None
    return fn(net, x, state)


def loss(net, state, y):
    """ℓ per example: ½‖y − s^N‖² (MSE), or the cross-entropy of softmax(W_out s^N + b_out)."""
    out = state[-1]
    if net.softmax_readout:
        return F.cross_entropy(_flat(out) @ net.readout_weight.T + net.readout_bias, y, reduction="none")
    target = F.one_hot(y, net.num_classes).to(out.dtype)
    return 0.5 * ((out - target) ** 2).sum(dim=1)


def logits(net, state):
    if net.softmax_readout:
        return _flat(state[-1]) @ net.readout_weight.T + net.readout_bias
    return state[-1]


def total_energy(net, x, state, beta=0.0, y=None):
    """Φ − βℓ, one value per example."""
    value = phi(net, x, state)
    if beta != 0.0:
        value = value - beta * loss(net, state, y)
    return value


# --------------------------------------------------------------------------- dynamics by autograd of Φ


def zero_state(net, x):
    """s_0 = 0, as leaves that require grad."""
    return [s.requires_grad_() for s in net.init_state(x.shape[0], like=x)]


def step(net, x, state, beta=0.0, y=None, create_graph=False):
    """One step: the gradient of Φ − βℓ with respect to the states, by autograd, then the transition
    (for a net that ``nudges_after_activation``: σ(∂Φ/∂s), then β(y − s^N) added to the output)."""
    after = beta != 0.0 and net.nudges_after_activation
    grads = torch.autograd.grad(total_energy(net, x, state, 0.0 if after else beta, y).sum(), state,
                                create_graph=create_graph)
    if isinstance(net, EnergyMLP):
        new = [net.eps * g for g in grads]  # ε·∂(Φ − βℓ)/∂s
        if net.cfg.clamp:
            new = [s.clamp(0.0, 1.0) for s in new]
    else:
        new = [net.act(g) for g in grads]  # σ(∂(Φ − βℓ)/∂s)
    if after:  # σ(∂Φ/∂s^N) + β(y − s^N)
        new[-1] = new[-1] + beta * (F.one_hot(y, net.num_classes).to(new[-1].dtype) - state[-1])
    if not create_graph:
        new = [s.detach().requires_grad_() for s in new]
    return new


def relax(net, x, state, steps, beta=0.0, y=None, create_graph=False):
    for _ in range(steps):
        state = step(net, x, state, beta, y, create_graph)
    return state


def free_phase(net, x, T):
    """s* after T steps from s_0 = 0 (detached)."""
    with torch.enable_grad():
        return [s.detach() for s in relax(net, x, zero_state(net, x), T)]


def _from(state):
    return [s.detach().clone().requires_grad_() for s in state]


def _signed_beta(beta: float, estimator: str) -> float:
    if estimator == "negative":
        return -abs(beta)
    if estimator in ("one-sided", "positive", "symmetric", "centered"):
        return beta
    raise ValueError(f"estimator {estimator!r}: the baseline has one-sided, negative and symmetric "
                     f"(random-sign would need eprun's own sign draws)")


def _readout_grad_(net, s_star, y):
    """Softmax read-out (outside Φ): .grad += ∂ mean ℓ(s*)/∂(W_out, b_out)."""
    if net.softmax_readout:
        loss(net, s_star, y).mean().backward()


# --------------------------------------------------------------------------- the rules


def ep_train_step(net, x, y, T, K, beta, estimator="one-sided"):
    """One EP training step; writes −Δθ into ``.grad`` (set afresh); returns s* (detached)."""
    beta = _signed_beta(beta, estimator)
    with torch.enable_grad():
        s_star = free_phase(net, x, T)
        nudged = [s.detach() for s in relax(net, x, _from(s_star), K, beta, y)]
        if estimator in ("symmetric", "centered"):
            anti = [s.detach() for s in relax(net, x, _from(s_star), K, -beta, y)]
            delta = (phi(net, x, nudged).mean() - phi(net, x, anti).mean()) / (2 * beta)
        else:
            delta = (phi(net, x, nudged).mean() - phi(net, x, s_star).mean()) / beta
        net.zero_grad()
        (-delta).backward()
        _readout_grad_(net, s_star, y)
    return s_star


def bptt_train_step(net, x, y, T):
    """∂(mean ℓ(s_T))/∂θ into ``.grad`` (set afresh), autograd through T autograd-of-Φ steps; returns s_T."""
    with torch.enable_grad():
        state = relax(net, x, zero_state(net, x), T, create_graph=True)
        net.zero_grad()
        loss(net, state, y).mean().backward()
    return [s.detach() for s in state]


def cep_train_step(net, x, y, T, K, beta, optimizer, estimator="one-sided"):
    """One C-EP step: free phase with θ fixed, then K nudged steps each followed by ``optimizer.step()``
    on the autograd gradient of −(Φ(s_{k+1}) − Φ(s_k))/β at the current θ_k. Returns s*."""
    beta = _signed_beta(beta, estimator)
    if estimator in ("symmetric", "centered"):
        raise ValueError("C-EP has no symmetric estimator")
    with torch.enable_grad():
        s_star = free_phase(net, x, T)
        cur = s_star
        for k in range(K):
            optimizer.zero_grad()
            nxt = [s.detach() for s in step(net, x, _from(cur), beta, y)]  # Φ rebuilt with θ_k
            delta = (phi(net, x, nxt).mean() - phi(net, x, cur).mean()) / beta
            (-delta).backward()
            if k == 0:
                _readout_grad_(net, s_star, y)
            optimizer.step()
            cur = nxt
        optimizer.zero_grad()
    return s_star


def predict(net, x, T):
    """Logits of the free phase (T autograd-of-Φ steps from s_0 = 0)."""
    state = free_phase(net, x, T)
    with torch.no_grad():
        return logits(net, state).detach()
