"""Feed-forward networks with a feedback path, for target propagation (Ernoult et al. 2022).

arXiv:2201.13415. Forward layers F_l: h_{l−1} → h_l, l = 1 … N, with h_0 = x and h_N the
logits. Feedback layers G_l: h_l → h_{l−1}, l = 2 … N (no target is ever needed for x, so
there is no G_1). Each G_l is built from F_l so that it has the form of F_l's transposed
Jacobian::

    dense        F(h) = σ(W h + b)            J_Fᵀ = Wᵀ diag(σ'(z))        G(u) = V σ(u) + c
    conv block   F(h) = P(σ(W ⋆ h + b))       J_Fᵀ = W ⋆ᵀ diag(σ'(z)) Pᵀ   G(u) = V ⋆ᵀ σ(Pᵀ u) + c
    classifier   F(h) = W h + b  (no σ)       J_Fᵀ = Wᵀ                    G(u) = V u + c

P is 2×2 max-pooling and Pᵀ max-unpooling at the indices of the forward pass (of the input
the feedback is applied around); ⋆ᵀ is the transposed convolution with the forward geometry.
Feedback training (``eprun.rules.dtp``) moves V towards Wᵀ (L-DRL) or towards an inverse of
F (vanilla DTP, TP).

Two kinds: ``ff_mlp`` (dense layers) and ``ff_conv`` (conv blocks, then dense layers, then
the linear classifier) — LeNet-style nets and the paper's SimpleVGG
(conv 128-128-256-256-512, 3×3, ELU, 2×2 max-pool, linear classifier) are ``ff_conv`` recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from eprun.limits import MAX_CHANNELS, MAX_UNITS, magnitude, within
from eprun.nets.base import ModelConfig, Network, dense_chain_problems
from eprun.nets.conv_lists import ConvLayerLists
from eprun.nets.elu import elu
from eprun.nets.parameters import per_layer, uniform_parameter
from eprun.nets.pooling import max_pool_with_indices

FFActivationName = Literal["elu", "relu", "leaky_relu", "tanh", "sigmoid", "identity"]

FF_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": elu,  # through exp on the CPU (eprun/nets/elu.py)
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,  # slope 0.01 below 0
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda z: z,
}


@dataclass
class FFMLPConfig(ModelConfig):
    """``model:`` section for ``kind: ff_mlp``: x → hidden … → linear classifier."""

    kind: str = "ff_mlp"
    hidden: list[int] = field(default_factory=lambda: [256])
    activation: FFActivationName = "elu"
    weight_scale: Union[float, list[float]] = 1.0

    def check(self):
        yield from dense_chain_problems(self.hidden, self.weight_scale, "[256]")


@dataclass
class FFConvConfig(ConvLayerLists, ModelConfig):
    """``model:`` section for ``kind: ff_conv``: conv blocks (conv, σ, pool), dense layers, classifier."""

    kind: str = "ff_conv"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernels: Union[int, list[int]] = 5
    paddings: Union[int, list[int]] = 2
    pools: Union[Literal["max", "none"], list[Literal["max", "none"]]] = "max"
    fc: list[int] = field(default_factory=list)  # hidden dense layers before the classifier
    activation: FFActivationName = "elu"
    weight_scale: Union[float, list[float]] = 1.0

    def check(self):
        yield from magnitude("weight_scale", self.weight_scale)
        if not self.channels:
            yield "channels", "needs at least one conv layer, e.g. [32, 64] (use kind: ff_mlp for none)"
        for name, values, high in (("channels", self.channels, MAX_CHANNELS), ("fc", self.fc, MAX_UNITS)):
            for size in values:
                yield from within(name, size, 1, high)
        yield from self.check_conv_lists({"kernels": (self.kernels, 1), "paddings": (self.paddings, 0)}, self.pools)
        n = len(self.channels) + len(self.fc) + 1
        if isinstance(self.weight_scale, list) and len(self.weight_scale) != n:
            yield "weight_scale", (f"a list needs one entry per weight layer ({n}: {len(self.channels)} conv + "
                                   f"{len(self.fc)} fc + classifier), got {len(self.weight_scale)}")


class FeedbackLayer(Protocol):
    """What :class:`FeedforwardNet` asks of each layer l: F_l, and G_l split as
    G_l(u) = feedback_map(feedback_input(u, indices)) + c_l, so that a difference of two feedbacks
    is one application of the linear part (:meth:`FeedforwardNet.feedback_difference`).
    :class:`DenseLayer` and :class:`ConvLayer` implement it."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight: nn.Parameter  # W_l
    bias: nn.Parameter  # b_l
    feedback_weight: Optional[nn.Parameter]  # V_l, None until add_feedback
    feedback_bias: Optional[nn.Parameter]  # c_l

    def add_feedback(self, generator: torch.Generator) -> None:
        """Draw (V_l, c_l)."""

    def forward_layer(self, h: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """h_l = F_l(h_{l−1}) and its pooling indices (None without pooling)."""

    def feedback(self, u: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        """G_l(u), shaped like h_{l−1}."""

    def feedback_input(self, u: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        """What G_l's linear part acts on (σ(Pᵀu); σ(u); u for the classifier)."""

    def feedback_map(self, v: torch.Tensor) -> torch.Tensor:
        """G_l's linear part V_l v (V_l ⋆ᵀ v), without c_l, shaped like h_{l−1}."""


class DenseLayer(nn.Module):
    """F(h) = σ(W h + b) on the flattened h; G(u) = V σ(u) + c, reshaped to h's shape."""

    def __init__(self, in_shape: tuple[int, ...], out: int, act: str, scale: float, generator):
        super().__init__()
        self.in_shape, self.out_shape, self.act = tuple(in_shape), (out,), FF_ACTIVATIONS[act]
        fan_in = math.prod(in_shape)
        self.weight = uniform_parameter((out, fan_in), fan_in, scale, generator)
        self.bias = uniform_parameter((out,), fan_in, 1.0, generator)
        self.feedback_weight: Optional[nn.Parameter] = None
        self.feedback_bias: Optional[nn.Parameter] = None

    def add_feedback(self, generator) -> None:
        """V (|h_{l−1}| × |h_l|) and c, U(−1/√|h_l|, 1/√|h_l|), drawn after every forward weight."""
        fan_in, size = self.out_shape[0], math.prod(self.in_shape)
        self.feedback_weight = uniform_parameter((size, fan_in), fan_in, 1.0, generator)
        self.feedback_bias = uniform_parameter((size,), fan_in, 1.0, generator)

    def forward_layer(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.act(F.linear(h.flatten(1), self.weight, self.bias)), None

    def feedback(self, u: torch.Tensor, indices: None) -> torch.Tensor:
        r = F.linear(self.act(u), self.feedback_weight, self.feedback_bias)
        return r.view(u.shape[0], *self.in_shape)

    def feedback_input(self, u: torch.Tensor, indices: None) -> torch.Tensor:
        """σ(u), what V multiplies in G(u) = V σ(u) + c."""
        return self.act(u)

    def feedback_map(self, v: torch.Tensor) -> torch.Tensor:
        """V v, G's linear part (no c), reshaped to h's shape."""
        return F.linear(v, self.feedback_weight).view(v.shape[0], *self.in_shape)


class ConvLayer(nn.Module):
    """F(h) = P(σ(W ⋆ h + b)) (stride 1, zero padding p, P = 2×2 max-pool or none);
    G(u) = V ⋆ᵀ σ(Pᵀ u) + c with Pᵀ the max-unpool at F's pooling indices."""

    def __init__(self, in_shape: tuple[int, int, int], out_channels: int, kernel: int, padding: int,
                 pool: str, act: str, scale: float, generator):
        super().__init__()
        c_in, height, width = in_shape
        self.in_shape, self.kernel, self.padding, self.pool = tuple(in_shape), kernel, padding, pool
        self.act = FF_ACTIVATIONS[act]
        self.conv_hw = (height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1)
        pooled = tuple(s // 2 for s in self.conv_hw) if pool == "max" else self.conv_hw
        self.out_shape = (out_channels, *pooled)
        fan_in = c_in * kernel * kernel
        self.weight = uniform_parameter((out_channels, c_in, kernel, kernel), fan_in, scale, generator)
        self.bias = uniform_parameter((out_channels,), fan_in, 1.0, generator)
        self.feedback_weight: Optional[nn.Parameter] = None
        self.feedback_bias: Optional[nn.Parameter] = None

    def add_feedback(self, generator) -> None:
        """V with conv_transpose2d's layout (C_out, C_in, k, k), fan-in C_out·k²."""
        c_out, c_in, k = self.out_shape[0], self.in_shape[0], self.kernel
        fan_in = c_out * k * k
        self.feedback_weight = uniform_parameter((c_out, c_in, k, k), fan_in, 1.0, generator)
        self.feedback_bias = uniform_parameter((c_in,), fan_in, 1.0, generator)

    def forward_layer(self, h: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        a = self.act(F.conv2d(h, self.weight, self.bias, padding=self.padding))
        if self.pool == "max":
            return max_pool_with_indices(a, 2)
        return a, None

    def feedback(self, u: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        return F.conv_transpose2d(self.feedback_input(u, indices), self.feedback_weight, self.feedback_bias,
                                  padding=self.padding)

    def feedback_input(self, u: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        """σ(Pᵀ u), what V ⋆ᵀ acts on in G(u) = V ⋆ᵀ σ(Pᵀ u) + c."""
        if self.pool == "max":
            u = F.max_unpool2d(u, indices, 2, 2, output_size=self.conv_hw)
        return self.act(u)

    def feedback_map(self, v: torch.Tensor) -> torch.Tensor:
        """V ⋆ᵀ v, G's linear part (no c)."""
        return F.conv_transpose2d(v, self.feedback_weight, None, padding=self.padding)


class FeedforwardNet(Network):
    """Forward layers F_1 … F_N and feedback layers G_2 … G_N (see the module docstring).

    ``forward_all(x)`` gives every h_l and the pooling indices; ``forward_layer(l, h)`` and
    ``feedback(l, u, indices)`` apply one F_l or G_l (l counted from 1). Parameters are drawn
    from the init generator in a fixed order — every forward (W, b) first, then every
    feedback (V, c) — so nets of the same recipe and seed have the same forward weights
    whatever the rule.
    """

    def __init__(self, layers: list[FeedbackLayer], num_classes: int, generator: torch.Generator):
        super().__init__()
        self.layers = nn.ModuleList(layers)  # each a FeedbackLayer
        self.num_classes = num_classes
        for layer in self.layers[1:]:
            layer.add_feedback(generator)

    @property
    def depth(self) -> int:
        """N, the number of forward layers."""
        return len(self.layers)

    # ------------------------------------------------------------------ parameters

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Forward parameters (W_l, b_l) per layer: what the recipe's optimiser trains."""
        return [[layer.weight, layer.bias] for layer in self.layers]

    def feedback_groups(self) -> list[list[nn.Parameter]]:
        """Feedback parameters (V_l, c_l) per layer, l = 2 … N: what the rule's feedback optimiser trains."""
        return [[layer.feedback_weight, layer.feedback_bias] for layer in self.layers[1:]]

    # ------------------------------------------------------------------ passes

    def forward_layer(self, l: int, h: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """h_l = F_l(h_{l−1}) and its pooling indices (None without pooling)."""
        return self.layers[l - 1].forward_layer(h)

    def feedback(self, l: int, u: torch.Tensor, indices: Optional[torch.Tensor]) -> torch.Tensor:
        """G_l(u), shaped like h_{l−1}; ``indices`` are F_l's pooling indices of the pass it belongs to."""
        return self.layers[l - 1].feedback(u, indices)

    def feedback_difference(self, l: int, a: torch.Tensor, indices_a: Optional[torch.Tensor], b: torch.Tensor,
                            indices_b: Optional[torch.Tensor]) -> torch.Tensor:
        """G_l(a) − G_l(b) = V_l (σ(Pᵀa) − σ(Pᵀb)) (⋆ᵀ for a conv layer): G_l is affine in σ(Pᵀu), so
        the difference is one application of its linear part, in which c_l cancels exactly. The
        inputs σ(Pᵀ·) do not depend on (V_l, c_l) and are computed without autograd; the result
        carries V_l's gradient only."""
        layer = self.layers[l - 1]
        with torch.no_grad():
            v = layer.feedback_input(a, indices_a) - layer.feedback_input(b, indices_b)
        return layer.feedback_map(v)

    def forward_all(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """[h_0 = x, h_1 … h_N] and [indices of F_1 … F_N] (index l−1 for F_l)."""
        hs, indices = [x], []
        for layer in self.layers:
            h, idx = layer.forward_layer(hs[-1])
            hs.append(h)
            indices.append(idx)
        return hs, indices

    def feedforward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[h_1 … h_N], autograd-friendly (the BP rule differentiates it)."""
        return self.forward_all(x)[0][1:]

    # ------------------------------------------------------------------ read-out

    def logits(self, state: list[torch.Tensor]) -> torch.Tensor:
        return state[-1]

    def loss(self, state: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy of the logits h_N."""
        return F.cross_entropy(state[-1], y, reduction="none")

    def describe(self) -> str:
        """e.g. ``1x28x28 c16-c32-10``."""
        first = self.layers[0].in_shape
        return "x".join(map(str, first)) + " " + "-".join(
            (f"c{layer.out_shape[0]}" if len(layer.out_shape) == 3 else str(layer.out_shape[0])) for layer in self.layers)


def _dense_chain(in_shape: tuple[int, ...], hidden: list[int], num_classes: int, act: str,
                 scales: list[float], generator) -> list[FeedbackLayer]:
    layers, shape = [], tuple(in_shape)
    for j, size in enumerate(list(hidden) + [num_classes]):
        last = j == len(hidden)
        layers.append(DenseLayer(shape, size, "identity" if last else act, scales[j], generator))
        shape = (size,)
    return layers


class FeedforwardMLP(FeedforwardNet):
    """``kind: ff_mlp``."""

    Config = FFMLPConfig

    @staticmethod
    def layer_count(cfg: FFMLPConfig) -> int:
        return len(cfg.hidden) + 1

    def __init__(self, cfg: FFMLPConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        layers = _dense_chain((math.prod(input_shape),), cfg.hidden, num_classes, cfg.activation,
                              per_layer(cfg.weight_scale, len(cfg.hidden) + 1), generator)
        super().__init__(layers, num_classes, generator)
        self.cfg = cfg


def _conv_shapes(cfg: FFConvConfig, input_shape: tuple[int, ...]) -> tuple[list[tuple[int, ...]], list[str]]:
    """The output shape of each conv block, and what does not fit (``"key: message"`` lines)."""
    shapes, problems = [], []
    if len(input_shape) != 3:
        return shapes, [f"kind: ff_conv needs image inputs (C, H, W), the data gives {tuple(input_shape)}"]
    c, height, width = input_shape
    for j, (ch, k, p, pool) in enumerate(zip(cfg.channels, cfg.per_conv_layer(cfg.kernels),
                                             cfg.per_conv_layer(cfg.paddings), cfg.per_conv_layer(cfg.pools))):
        height, width = height + 2 * p - k + 1, width + 2 * p - k + 1
        if height < 1 or width < 1 or (pool == "max" and min(height, width) < 2):
            problems.append(f"channels: conv layer {j + 1} (kernel {k}, padding {p}, pool {pool}) leaves no "
                            f"spatial extent (its input is {c}×{height - 2 * p + k - 1}×{width - 2 * p + k - 1})")
            break
        if pool == "max":
            height, width = height // 2, width // 2
        c = ch
        shapes.append((c, height, width))
    return shapes, problems


class FeedforwardConvNet(FeedforwardNet):
    """``kind: ff_conv``."""

    Config = FFConvConfig

    @staticmethod
    def layer_count(cfg: FFConvConfig) -> int:
        return len(cfg.channels) + len(cfg.fc) + 1

    @staticmethod
    def check_fits(cfg: FFConvConfig, input_shape: tuple[int, ...], num_classes: int) -> list[str]:
        return _conv_shapes(cfg, input_shape)[1]

    def __init__(self, cfg: FFConvConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        problems = self.check_fits(cfg, input_shape, num_classes)
        if problems:
            raise ValueError("; ".join(problems))
        scales = per_layer(cfg.weight_scale, self.layer_count(cfg))
        layers, shape = [], tuple(input_shape)
        for j, (ch, k, p, pool) in enumerate(zip(cfg.channels, cfg.per_conv_layer(cfg.kernels),
                                                 cfg.per_conv_layer(cfg.paddings), cfg.per_conv_layer(cfg.pools))):
            layers.append(ConvLayer(shape, ch, k, p, pool, cfg.activation, scales[j], generator))
            shape = layers[-1].out_shape
        layers += _dense_chain(shape, cfg.fc, num_classes, cfg.activation, scales[len(cfg.channels):], generator)
        super().__init__(layers, num_classes, generator)
        self.cfg = cfg
