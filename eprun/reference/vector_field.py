"""VF and C-VF on the vector-field MLP, formulated as the authors' code of Ernoult et al. 2020
(arXiv:2005.04168; ``ernoult/continualEP``, ``VFdisc``) does it.

The net has no primitive function Φ, so there is nothing for autograd to differentiate: each step
rebuilds every pre-activation from θ and the input x (the input drive W_0 x + b_1 recomputed at
every step) and applies σ, out of place::

    s^n_{t+1} = σ(W_{n−1} s^{n−1}_t + b_n + B_n s^{n+1}_t)        [+ β(y − s^N_t) inside σ at n = N]

and the updates are the post-synaptic change times the pre-synaptic units at the earlier state,
batch means, written into ``.grad`` as −Δθ::

    VF      W_n.grad = (1/β)(s^{n+1,*} − s^{n+1,β}) s^{n,*ᵀ},   b_{n+1}.grad = (1/β)(s^{n+1,*} − s^{n+1,β}),
            B_n.grad = (1/β)(s^{n,*} − s^{n,β}) s^{n+1,*ᵀ}                       (after T free, K nudged steps)
    C-VF    the same with (s_k, s_{k+1}) in place of (s*, s^β) at every nudged step k, each followed
            by the optimiser's step (θ_k → θ_{k+1}, so step k + 1 runs with the new weights)
    BPTT    ∂ℓ(s_T, y)/∂θ by autograd through the T steps (ℓ = ½‖y − s^N‖²)

``same_update`` gives W_n and B_nᵀ both the sum of the two. The MSE read-out and the end-point
update (``nudged_update: endpoints``) only. The net's parameters are read (W_n, b_n, B_n, σ) but
none of its relaxation or update code, so ``eprun bench`` times eprun against this and the
tests hold eprun's updates equal to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eprun.nets.vf_mlp import VectorFieldMLP


def supports(net) -> bool:
    """The vector-field MLP with the MSE read-out and the end-point update."""
    return (type(net) is VectorFieldMLP and not net.softmax_readout
            and net.cfg.nudged_update == "endpoints")


def _check(net) -> None:
    if not supports(net):
        raise ValueError(f"no vector-field reference for {type(net).__name__} "
                         f"(the vf_mlp net with readout: mse and nudged_update: endpoints)")


def _layers(x, state):
    return [x.reshape(x.shape[0], -1)] + list(state)


def step(net, x, state, beta=0.0, y=None):
    """One step of the vector field, every pre-activation rebuilt from θ and x (out of place)."""
    layers = _layers(x, state)
    new = []
    for n in range(1, len(layers)):
        z = layers[n - 1] @ net.weights[n - 1].T + net.biases[n - 1]
        if n + 1 < len(layers):
            z = z + layers[n + 1] @ net.backward_weight(n).T
        error = (F.one_hot(y, net.num_classes).to(z.dtype) - layers[n]) if n == len(layers) - 1 and beta != 0.0 else None
        if error is not None and not net.nudges_after_activation:
            z = z + beta * error
        new.append(net.act(z))
        if error is not None and net.nudges_after_activation:  # σ(z^N) + β(y − s^N)
            new[-1] = new[-1] + beta * error
    return new


def relax(net, x, state, steps, beta=0.0, y=None):
    for _ in range(steps):
        state = step(net, x, state, beta, y)
    return state


def _zero_state(net, x):
    """s_0 = 0 for every layer."""
    return [x.new_zeros(x.shape[0], size) for size in net.sizes[1:]]


def free_phase(net, x, T):
    """s* after T steps from s_0 = 0."""
    with torch.no_grad():
        return relax(net, x, _zero_state(net, x), T)


def _signed_beta(net, beta: float, estimator: str) -> float:
    """β with the estimator's sign (one-sided or negative: the reference has no other), after
    checking the net is one this formulation covers."""
    _check(net)
    if estimator not in ("one-sided", "positive", "negative"):
        raise ValueError(f"estimator {estimator!r}: the vector-field reference has one-sided and negative")
    return -abs(beta) if estimator == "negative" else beta


def _write_vf_update_(net, x, state_a, state_b, beta) -> None:
    """θ.grad ← (1/β)·V(a, b): the post-synaptic change from b to a times the pre-synaptic units at a."""
    layers_a, layers_b = _layers(x, state_a), _layers(x, state_b)
    batch = layers_a[0].shape[0]
    diff = [None] + [(a - b) / beta for a, b in zip(layers_a[1:], layers_b[1:])]
    forward = [diff[n + 1].T @ layers_a[n] / batch for n in range(len(net.weights))]
    backward = {n: diff[n].T @ layers_a[n + 1] / batch for n in range(1, len(net.weights))}
    if net.cfg.same_update:
        for n in backward:
            tied = forward[n] + backward[n].T
            forward[n], backward[n] = tied, tied.T
    for n, (w, b) in enumerate(zip(net.weights, net.biases)):
        w.grad = forward[n].clone()
        b.grad = diff[n + 1].mean(dim=0)
    for n, g in backward.items():
        net.backward_weight(n).grad = g.clone()


def ep_train_step(net, x, y, T, K, beta, estimator="one-sided"):
    """One VF training step (free phase, K nudged steps, the end-point update into ``.grad``); returns s*."""
    beta = _signed_beta(net, beta, estimator)
    s_star = free_phase(net, x, T)
    with torch.no_grad():
        nudged = relax(net, x, s_star, K, beta, y)
        _write_vf_update_(net, x, s_star, nudged, beta)
    return s_star


def cep_train_step(net, x, y, T, K, beta, optimizer, estimator="one-sided"):
    """One C-VF step: the free phase with θ fixed, then K nudged steps, each from θ_k and followed by
    ``optimizer.step()`` on (1/β)·V(s_k, s_{k+1}). Returns s*."""
    beta = _signed_beta(net, beta, estimator)
    s_star = free_phase(net, x, T)
    cur = s_star
    with torch.no_grad():
        for _ in range(K):
            nxt = step(net, x, cur, beta, y)
            _write_vf_update_(net, x, cur, nxt, beta)
            optimizer.step()
            cur = nxt
    optimizer.zero_grad()
    return s_star


def bptt_train_step(net, x, y, T):
    """∂(mean ½‖y − s^N_T‖²)/∂θ into ``.grad`` (set afresh), autograd through T steps; returns s_T."""
    _check(net)
    with torch.enable_grad():
        state = relax(net, x, _zero_state(net, x), T)
        net.zero_grad()
        target = F.one_hot(y, net.num_classes).to(state[-1].dtype)
        (0.5 * ((state[-1] - target) ** 2).sum(dim=1)).mean().backward()
    return [s.detach() for s in state]


def predict(net, x, T):
    """The output layer after the free phase (the MSE read-out's logits)."""
    return free_phase(net, x, T)[-1]
