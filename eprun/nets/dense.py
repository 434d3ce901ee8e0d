"""The fully connected chain x = s⁰ → s¹ … s^N shared by the prototypical and vector-field MLPs:
its initialisation, the per-phase constants of its relaxation, and its feed-forward twin."""

from __future__ import annotations

import math

import torch

from eprun.nets.parameters import parameters_in, per_layer, uniform_parameter


def init_dense_chain(net, cfg, input_shape: tuple[int, ...], n_layers: int, generator: torch.Generator) -> None:
    """Give ``net`` (a :class:`~eprun.nets.layered.LayeredNetwork`) the chain of ``cfg.hidden``
    (+ the classes for an MSE read-out), drawn in a fixed order — W_n, b_{n+1} per layer, then the
    softmax read-out — so every net built this way from the same seed has the same W.
    ``net.sizes`` = [|s⁰| … |s^N|]."""
    out_sizes = list(cfg.hidden) if net.softmax_readout else list(cfg.hidden) + [net.num_classes]
    net.sizes = [math.prod(input_shape)] + out_sizes
    scales = per_layer(cfg.weight_scale, n_layers)
    for n in range(len(net.sizes) - 1):
        fan_in = net.sizes[n]
        net.weights.append(uniform_parameter((net.sizes[n + 1], fan_in), fan_in, scales[n], generator))
        net.biases.append(uniform_parameter((net.sizes[n + 1],), fan_in, 1.0, generator))
    if net.softmax_readout:
        net.add_readout(net.sizes[-1], scales[-1], generator)


def dense_constants(net, drive: torch.Tensor, n_layers: int, beta: float,
                    target: torch.Tensor | None) -> list[torch.Tensor]:
    """The constants of a dense net's layers during a phase: c_1 = the input drive, then
    a·b_n + c for the layers above (the bias itself when a = 1 and c = 0), plus a·β·y at the
    output for the MSE nudge (a, c: σ's scale and shift)."""
    a, shift = net.act.scale, net.act.shift
    biases = parameters_in(net.biases)[1:n_layers]
    const = [drive] + [b if a == 1.0 and shift == 0.0 else b * a + shift for b in biases]
    if beta != 0.0 and target is not None and not net.softmax_readout and not net.nudges_after_activation:
        const[-1] = torch.add(const[-1], target, alpha=a * beta)
    return const


def dense_feedforward(net, x: torch.Tensor) -> list[torch.Tensor]:
    """s^{n+1} = σ(W_n s^n + b_{n+1}) bottom-up through ``net.weights`` / ``net.biases``: the
    feed-forward twin of a dense EP net (the BP baseline), autograd-friendly."""
    h = x.reshape(x.shape[0], -1)
    state = []
    for w, b in zip(net.weights, net.biases):
        h = net.act(h @ w.T + b)
        state.append(h)
    return state


def dense_weight_products(sizes: list[int], batch: int):
    """:class:`~eprun.nets.base.WeightProducts` of a dense chain: P_j = B·n_j·n_{j+1}."""
    from eprun.nets.base import WeightProducts

    products = tuple(batch * sizes[j] * sizes[j + 1] for j in range(len(sizes) - 1))
    return WeightProducts(products, (False,) * len(products))
