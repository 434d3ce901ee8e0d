"""The baseline EP step, formulated as the public reference code does it.

At every step of both phases Φ (with −βℓ when nudged) is rebuilt from the parameters and
differentiated by autograd with respect to the states, s_{t+1} = σ(∂Φ/∂s); the input drive
W_0 x + b_1 is recomputed inside Φ at every step. The parameter update is autograd of
−(Φ(s^β) − Φ(s*))/β. Kept only as the baseline speed is measured against; it reuses the
parameters of an :class:`eprun.nets.mlp.PrototypicalMLP`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _phi(net, x, state, beta, y_onehot):
    layers = [x] + state
    phi = 0.0
    for n, (w, b) in enumerate(zip(net.weights, net.biases)):
        phi = phi + ((layers[n] @ w.T + b) * layers[n + 1]).sum(dim=1)
    if beta != 0.0:
        phi = phi - beta * 0.5 * ((layers[-1] - y_onehot) ** 2).sum(dim=1)
    return phi


def _relax(net, x, state, steps, beta, y_onehot):
    for _ in range(steps):
        phi = _phi(net, x, state, beta, y_onehot)
        grads = torch.autograd.grad(phi.sum(), state)
        state = [net.act(g).requires_grad_() for g in grads]
    return state


def autograd_train_step(net, x, y, T, K, beta):
    """One EP training step (MSE read-out) by autograd of Φ; writes −Δθ into ``.grad``."""
    x = x.reshape(x.shape[0], -1)
    y_onehot = F.one_hot(y, net.num_classes).to(x.dtype)
    state = [torch.zeros(x.shape[0], n, requires_grad=True) for n in net.sizes[1:]]
    free = _relax(net, x, state, T, 0.0, y_onehot)
    free_copy = [s.detach().clone() for s in free]
    nudged = _relax(net, x, free, K, beta, y_onehot)
    nudged = [s.detach() for s in nudged]
    delta = (_phi(net, x, nudged, 0.0, y_onehot).mean() - _phi(net, x, free_copy, 0.0, y_onehot).mean()) / beta
    net.zero_grad()
    (-delta).backward()
    return free_copy


def autograd_predict(net, x, T):
    x = x.reshape(x.shape[0], -1)
    state = [torch.zeros(x.shape[0], n, requires_grad=True) for n in net.sizes[1:]]
    return _relax(net, x, state, T, 0.0, None)[-1].detach()
