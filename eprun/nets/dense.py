"""The fully connected chain x = s⁰ → s¹ … s^N shared by the prototypical, vector-field and
energy-based MLPs: the net class of its states, its initialisation, the per-phase constants of its
relaxation, and its feed-forward twin."""

from __future__ import annotations

import math
from typing import Protocol, Union

import torch

from eprun.nets.layered import LayeredNetwork
from eprun.nets.parameters import parameters_in, per_layer, uniform_parameter


class DenseChainConfig(Protocol):
    """The ``model:`` keys every fully connected chain is built from."""

    hidden: list[int]
    activation: str
    readout: str
    weight_scale: Union[float, list[float]]


class DenseChainNetwork(LayeredNetwork):
    """A layered net on the chain x = s⁰ → s¹ … s^N, ``sizes`` = [|s⁰| … |s^N|]: one weight layer
    per hidden layer plus the output's, and a state of one (batch, |s^n|) tensor per layer n ≥ 1.

    Built by :func:`init_dense_chain`, so every net of this class from the same seed and shapes
    starts from the same W and b."""

    sizes: list[int]

    def __init__(self, cfg: DenseChainConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        super().__init__(cfg.activation, num_classes, cfg.readout == "softmax")
        self.cfg = cfg
        init_dense_chain(self, cfg, input_shape, self.layer_count(cfg), generator)

    @staticmethod
    def layer_count(cfg: DenseChainConfig) -> int:
        """Number of weight layers (the length of per-layer lists such as learning rates)."""
        return len(cfg.hidden) + 1

    def init_state(self, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        """s_0 = 0 for every layer."""
        return [like.new_zeros(batch, size) for size in self.sizes[1:]]


def init_dense_chain(net: LayeredNetwork, cfg: DenseChainConfig, input_shape: tuple[int, ...], n_layers: int,
                     generator: torch.Generator) -> None:
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


def chain_pre_activations(net: LayeredNetwork, layers: list[torch.Tensor], top_down: list[torch.Tensor],
                          input_term: torch.Tensor | None) -> list[torch.Tensor]:
    """W_{n−1} u^{n−1} + b_n + u^{n+1} M_n for each layer n ≥ 1 of ``layers`` = [u⁰ … u^N] (the
    flattened input and the states, or their ρ), with ``top_down[n − 1]`` = M_n and no top-down term
    into u^N; ``input_term``, if given, stands for W_0 u⁰ + b_1. Out of place, autograd-friendly."""
    out = []
    for n in range(1, len(layers)):
        if n == 1 and input_term is not None:
            g = input_term
        else:
            g = layers[n - 1] @ net.weights[n - 1].T + net.biases[n - 1]
        if n + 1 < len(layers):
            g = g + layers[n + 1] @ top_down[n - 1]
        out.append(g)
    return out


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
