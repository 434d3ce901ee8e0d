"""The prototypical (discrete-time) convolutional EP network.

Ernoult et al. 2019 (the first EP-trained conv net, MNIST) and Laborieux et al. 2021 (the
deep ConvNet on CIFAR-10). Layers s = (s¹ … s^N), static input x = s⁰: the first C layers are
conv layers (state (channels, height, width)), the rest fully connected. Per example::

    Φ(x, s, θ) = Σ_{n<C} s^{n+1} · P_n(W_n ⋆ s^n + b_{n+1})  +  Σ_{n≥C} s^{n+1} · (W_n s^n + b_{n+1})

⋆ is the convolution (stride, padding), P_n the pooling after it ("max", "avg" or "none",
non-overlapping windows of ``pool_size``), the bias added before pooling (as in Laborieux
et al.'s code; for max and average pooling it commutes with P). s^C is flattened before the
first fully connected layer. Free dynamics ``s_{t+1} = σ(∂Φ/∂s(x, s_t, θ))``::

    s^n_{t+1} = σ( P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n)  +  W_nᵀ ⋆ P_nᵀ(s^{n+1}) )        (conv above)
    s^n_{t+1} = σ( P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n)  +  reshape(W_nᵀ s^{n+1}) )       (fc above)

where W_nᵀ ⋆ is the transposed convolution and P_nᵀ the adjoint of the pooling's Jacobian at
z_n = W_n ⋆ s^n + b_{n+1}: for max pooling it routes s^{n+1} to the argmax positions of z_n
(``max_unpool2d`` with the indices of the forward pool of z_n at the same state), for
average pooling it spreads s^{n+1}/p² evenly over each window, for "none" it is the identity.

Nudging adds −β ℓ(s^N, y) to Φ exactly as :class:`~eprun.nets.mlp.PrototypicalMLP` does:
MSE adds β(y − s^N) to the output's pre-activation; with ``readout: softmax`` the read-out is
outside Φ, the prediction is softmax(W_out s^N + b_out) and the nudge is β W_outᵀ(y − p).
``nudge: post_activation`` (MSE only) adds it after σ instead, as Ernoult et al. 2019 write the
second phase, s^β_{t+1} = ∂Φ/∂s(x, s^β_t, θ) − β ∂ℓ/∂s(s^β_t, y) with ∂Φ/∂s read as σ(·), and as
their conv net steps (``convEP.stepper``: the output's σ(W s + b), then + β(y − s^N_t), no clamp)::

    s^N_{t+1} = σ(z^N) + β(y − s^N_t)

The two differ where the output saturates: with the nudge inside a hard sigmoid, an output unit
whose z^N stays below −β(1 − s^N) is not moved by the nudge, so s^β = s* there and EP's update of
every layer is zero; once every output unit of every example is there (as a P-conv run did,
recipes/README.md), training cannot leave. After σ, the nudge always moves s^N towards y.

Closed-form ∂Φ/∂θ (batch mean), with U_n = P_nᵀ(s^{n+1}) at z_n(s^n)::

    ∂Φ/∂W_n = conv-weight-gradient of U_n against s^n  (``torch.nn.grad.conv2d_weight``)
    ∂Φ/∂b_{n+1} = Σ_positions U_n

For max pooling the argmax depends on s^n, so it is recomputed at the state where ∂Φ/∂θ is
evaluated — except for the first layer, whose z_0 = W_0 ⋆ x + b_1 is the same at every state.

The hot path (:meth:`relax`) is closed form and runs without autograd: the first layer's
pooled drive P_0(W_0 ⋆ x + b_1) depends on x only and is computed once per batch; per step
each conv layer n ≥ 1 runs one convolution (bias-free, its bias folded into a per-channel
constant after pooling) whose pooled output is the bottom-up term of s^{n+1} and whose argmax
indices give the top-down term into s^n. It also runs the even/odd (``async``) schedule of
Scellier et al. 2023 and stops a phase early at a tolerance (see :meth:`relax`). :meth:`phi`
exists as the oracle the tests differentiate with autograd.

Where they apply, compiled kernels compute the per-step convolution and top-down term
(:mod:`eprun.nets.conv_kernels`); ``EPRUN_NATIVE=0`` keeps torch for everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import torch.nn.functional as F

from eprun import stopping
from eprun.limits import MAX_CHANNELS, MAX_KERNEL, MAX_UNITS, magnitude, within
from eprun.nets.activations import ActivationName
from eprun.nets.base import ModelConfig, WeightProducts
from eprun.nets.conv_kernels import ConvKernels
from eprun.nets.conv_lists import ConvLayerLists
from eprun.nets.early_stop import check_tol_scope, largest_change, relax_each_example
from eprun.nets.pooling import max_pool_with_indices
from eprun.nets.relax_products import RelaxProducts
from eprun.nets.layered import LayeredNetwork
from eprun.nets.parameters import grad_of, per_layer, uniform_parameter

PoolKind = Literal["max", "avg", "none"]


@dataclass
class ConvConfig(ConvLayerLists, ModelConfig):
    """``model:`` section for ``kind: conv``; the defaults are Ernoult et al. 2019's MNIST net.

    ``kernels``, ``strides``, ``paddings`` and ``pools`` take one value per conv layer, or a
    single value for all. Pooling windows are ``pool_size`` × ``pool_size`` with stride
    ``pool_size`` (non-overlapping: the max-pool adjoint scatters, it would not sum overlaps).
    ``fc`` lists the fully connected layers after the conv layers; with ``readout: mse`` the
    last is the output layer (one unit per class), with ``softmax`` the read-out is extra.
    """

    kind: str = "conv"
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernels: Union[int, list[int]] = 5
    strides: Union[int, list[int]] = 1
    paddings: Union[int, list[int]] = 0
    pools: Union[PoolKind, list[PoolKind]] = "max"
    pool_size: int = 2
    fc: list[int] = field(default_factory=lambda: [10])
    activation: ActivationName = "hard_sigmoid"
    readout: Literal["mse", "softmax"] = "mse"
    weight_scale: Union[float, list[float]] = 1.0
    #: where the nudged phase adds β(y − s^N): to the output's pre-activation (Φ − βℓ) or after σ
    nudge: Literal["pre_activation", "post_activation"] = "pre_activation"

    def check(self):
        yield from magnitude("weight_scale", self.weight_scale)
        if self.nudge == "post_activation" and self.readout != "mse":
            yield "nudge", "post_activation nudges the output layer s^N after σ: it needs readout: mse"
        if not self.channels:
            yield "channels", "needs at least one conv layer, e.g. [32, 64] (use kind: mlp for none)"
        for size in self.channels:
            yield from within("channels", size, 1, MAX_CHANNELS)
        yield from self.check_conv_lists({"kernels": (self.kernels, 1), "strides": (self.strides, 1),
                                          "paddings": (self.paddings, 0)}, self.pools)
        for pool in self.per_conv_layer(self.pools):
            if pool not in ("max", "avg", "none"):
                yield "pools", f"unknown pooling {pool!r} (allowed: max, avg, none)"
        yield from within("pool_size", self.pool_size, 1, MAX_KERNEL)
        for size in self.fc:
            yield from within("fc", size, 1, MAX_UNITS)
        if self.readout == "mse" and not self.fc:
            yield "fc", "with readout: mse the last fc layer is the output layer; needs at least one, e.g. [10]"
        n_layers = ConvNet.layer_count(self)
        if isinstance(self.weight_scale, list) and len(self.weight_scale) != n_layers:
            yield "weight_scale", (
                f"a list needs one entry per weight layer ({n_layers}: {len(self.channels)} conv + "
                f"{len(self.fc)} fc{' + read-out' if self.readout == 'softmax' else ''}), got {len(self.weight_scale)}"
            )


def _conv_geometry(cfg: ConvConfig, input_shape: tuple[int, ...]) -> tuple[list, list[str]]:
    """Per conv layer (in shape, conv-output (H, W), state shape); and what does not fit."""
    if len(input_shape) != 3:
        return [], [f"channels: the conv net needs image inputs (channels, height, width), "
                    f"the dataset gives shape {tuple(input_shape)}"]
    layers, problems = [], []
    c, h, w = input_shape
    p = cfg.pool_size
    for j, (out_ch, k, s, pad, pool) in enumerate(zip(
            cfg.channels, *(cfg.per_conv_layer(v) for v in (cfg.kernels, cfg.strides, cfg.paddings, cfg.pools)))):
        hz, wz = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        if hz < 1 or wz < 1:
            problems.append(f"kernels: conv layer {j + 1} (kernel {k}, padding {pad}) does not fit its "
                            f"{h}×{w} input; use a smaller kernel, more padding or fewer layers")
            break
        ho, wo = (hz // p, wz // p) if pool != "none" else (hz, wz)
        if ho < 1 or wo < 1:
            problems.append(f"pools: the {p}×{p} pooling after conv layer {j + 1} does not fit its "
                            f"{hz}×{wz} output; use pools: none there, padding, or fewer layers")
            break
        layers.append(((c, h, w), (hz, wz), (out_ch, ho, wo)))
        c, h, w = out_ch, ho, wo
    return layers, problems


class ConvNet(LayeredNetwork):
    """Conv + fully connected net with the prototypical EP dynamics and a feed-forward twin."""

    relax_schedules = True  # relax() takes order / tol / check_every / tol_scope
    Config = ConvConfig

    @staticmethod
    def layer_count(cfg: ConvConfig) -> int:
        """Number of weight layers: conv + fc (+ the softmax read-out)."""
        return len(cfg.channels) + len(cfg.fc) + (1 if cfg.readout == "softmax" else 0)

    @staticmethod
    def check_fits(cfg: ConvConfig, input_shape: tuple[int, ...], num_classes: int) -> list[str]:
        """What does not fit the data, one ``"key: message"`` line each (key within ``model:``)."""
        _, problems = _conv_geometry(cfg, input_shape)
        if cfg.readout == "mse" and cfg.fc and cfg.fc[-1] != num_classes:
            problems.append(f"fc: with readout: mse the last fc layer is the output and needs one unit per "
                            f"class ({num_classes}), got {cfg.fc[-1]}")
        return problems

    def __init__(self, cfg: ConvConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        problems = self.check_fits(cfg, input_shape, num_classes)
        if problems:
            raise ValueError("; ".join(problems))
        super().__init__(cfg.activation, num_classes, cfg.readout == "softmax")
        self.cfg = cfg
        self.nudges_after_activation = cfg.nudge == "post_activation"  # model.nudge: β(y − s^N) after σ
        self.n_conv = len(cfg.channels)
        self.strides = cfg.per_conv_layer(cfg.strides)
        self.paddings = cfg.per_conv_layer(cfg.paddings)
        self.pools = cfg.per_conv_layer(cfg.pools)
        self.pool_size = cfg.pool_size
        geometry, _ = _conv_geometry(cfg, input_shape)
        self.input_shape = tuple(input_shape)
        self.conv_hw = [hw for _, hw, _ in geometry]  # (H, W) of z_n = W_n ⋆ s^n + b, before pooling
        # output_padding so that the transposed convolution gives back s^n's exact size
        self.output_paddings = [
            tuple((size + 2 * pad - k) % stride for size in in_shape[1:])
            for (in_shape, _, _), k, stride, pad in zip(geometry, cfg.per_conv_layer(cfg.kernels),
                                                        self.strides, self.paddings)
        ]
        self.state_shapes = [shape for _, _, shape in geometry]  # per example, s¹ … s^N
        self.state_shapes += [(size,) for size in cfg.fc]
        scales = per_layer(cfg.weight_scale, self.layer_count(cfg))

        def uniform(shape, fan_in, scale):
            return uniform_parameter(shape, fan_in, scale, generator)

        for j, ((in_shape, _, _), k) in enumerate(zip(geometry, cfg.per_conv_layer(cfg.kernels))):
            fan_in = in_shape[0] * k * k
            self.weights.append(uniform((cfg.channels[j], in_shape[0], k, k), fan_in, scales[j]))
            self.biases.append(uniform((cfg.channels[j],), fan_in, 1.0))
        for j in range(self.n_conv, len(self.state_shapes)):
            fan_in = math.prod(self.state_shapes[j - 1])
            self.weights.append(uniform((self.state_shapes[j][0], fan_in), fan_in, scales[j]))
            self.biases.append(uniform((self.state_shapes[j][0],), fan_in, 1.0))
        if self.softmax_readout:
            self.add_readout(math.prod(self.state_shapes[-1]), scales[-1], generator)

    # ------------------------------------------------------------------ structure

    def init_state(self, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        """s_0 = 0 for every layer: (batch, C, H, W) for conv layers, (batch, n) for fc layers."""
        return [like.new_zeros(batch, *shape) for shape in self.state_shapes]

    # ------------------------------------------------------------------ pooling and its adjoint

    def _pool(self, n: int, z: torch.Tensor, keep_channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P_n(z) and, for max pooling, the argmax indices (for :meth:`_unpool`)."""
        p = self.pool_size
        if self.pools[n] == "max":
            return max_pool_with_indices(z, p, keep_channels_last)
        if self.pools[n] == "avg":
            return F.avg_pool2d(z, p, p), None
        return z, None

    def _unpool(self, n: int, s: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        """U = P_nᵀ(s): the adjoint of P_n's Jacobian at z_n, applied to s (shaped like z_n)."""
        p, hw = self.pool_size, self.conv_hw[n]
        if self.pools[n] == "max":  # route s to the argmax of each window
            return F.max_unpool2d(s, indices, p, p, output_size=hw)
        if self.pools[n] == "avg":  # spread s/p² over each window; rows/columns the floor dropped get 0
            b, c, h, w = s.shape
            u = (s * (1.0 / (p * p)))[:, :, :, None, :, None].expand(b, c, h, p, w, p).reshape(b, c, h * p, w * p)
            if (h * p, w * p) != tuple(hw):
                u = F.pad(u, (0, hw[1] - w * p, 0, hw[0] - h * p))
            return u
        return s

    def _conv(self, n: int, s: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """z_n = W_n ⋆ s^n (+ b_{n+1})."""
        return F.conv2d(s, self.weights[n], self.biases[n] if bias else None, self.strides[n], self.paddings[n])

    def _conv_t(self, n: int, u: torch.Tensor) -> torch.Tensor:
        """W_nᵀ ⋆ u: the transposed convolution, back to s^n's size."""
        return F.conv_transpose2d(u, self.weights[n], None, self.strides[n], self.paddings[n],
                                  self.output_paddings[n])

    def _conv_t_down(self, n: int, u: torch.Tensor) -> torch.Tensor:
        """The top-down transposed convolution into s^n used by :meth:`relax` (W_n here; a
        vector-field net overrides it with its backward kernel)."""
        return self._conv_t(n, u)

    def _top_down_weights(self) -> list[torch.Tensor]:
        """Weight n carries the top-down signal from s^{n+1} into s^n in :meth:`relax` (W_n here;
        a vector-field net returns its backward weights B_n)."""
        return list(self.weights)

    def _conv_weight_grad(self, n: int, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Σ_batch ∂(u · (W_n ⋆ s))/∂W_n."""
        return torch.nn.grad.conv2d_weight(s, self.weights[n].shape, u, self.strides[n], self.paddings[n])

    def _unpooled_at(self, n: int, below: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
        """U_n = P_nᵀ(s^{n+1}) with P_n's argmax (max pooling) taken at z_n(s^n = ``below``)."""
        indices = self._pool(n, self._conv(n, below))[1] if self.pools[n] == "max" else None
        return self._unpool(n, above, indices)

    # ------------------------------------------------------------------ Φ and its closed-form derivatives

    def phi(self, x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """Φ(x, s, θ) = Σ s^{n+1}·P_n(W_n ⋆ s^n + b) + Σ s^{n+1}·(W_n s^n + b), per example (autograd oracle)."""
        layers = [x] + list(state)
        total = 0.0
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            if n < self.n_conv:
                pooled = self._pool(n, F.conv2d(layers[n], w, b, self.strides[n], self.paddings[n]))[0]
                total = total + (layers[n + 1] * pooled).sum(dim=(1, 2, 3))
            else:
                total = total + (layers[n + 1] * (self.flatten(layers[n]) @ w.T + b)).sum(dim=1)
        return total

    def input_term(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """P_0(W_0 ⋆ x + b_1) and its pooling indices: the part of ∂Φ/∂s¹ that depends on the
        static input only (autograd-friendly)."""
        return self._pool(0, self._conv(0, x))

    def _bottom_up(self, layers: list[torch.Tensor], input_term: tuple[torch.Tensor, torch.Tensor | None] | None
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """For n = 1 … N the bottom-up term P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n) (or W_{n−1} s^{n−1} + b_n
        above the convolutions), ``layers`` = [x, s¹, …]; and the argmax of every pool (index n−1 for
        P_{n−1}; None past the convolutions), which the top-down terms unpool through."""
        terms = []
        indices = [None] * len(layers)
        for n in range(1, len(layers)):
            if n == 1 and input_term is not None:
                g, indices[0] = input_term
            elif n - 1 < self.n_conv:
                g, indices[n - 1] = self._pool(n - 1, self._conv(n - 1, layers[n - 1]))
            else:
                g = self.flatten(layers[n - 1]) @ self.weights[n - 1].T + self.biases[n - 1]
            terms.append(g)
        return terms, indices

    def dphi_ds(self, x: torch.Tensor, state: list[torch.Tensor],
                input_term: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """∂Φ/∂s^n = bottom-up P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n) (or W s + b) + top-down term, per layer;
        ``input_term``, if given, is :meth:`input_term` of x, computed once instead of at every call."""
        layers = [x] + list(state)
        grads, indices = self._bottom_up(layers, input_term)
        for n in range(1, len(layers) - 1):  # top-down from s^{n+1} into s^n
            above = layers[n + 1]
            if n < self.n_conv:  # W_nᵀ ⋆ P_nᵀ(s^{n+1})
                td = self._conv_t(n, self._unpool(n, above, indices[n]))
            else:  # reshape(W_nᵀ s^{n+1})
                td = (above @ self.weights[n]).reshape(layers[n].shape)
            grads[n - 1] = grads[n - 1] + td
        return grads

    def dphi_dtheta(self, x: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Batch mean of ∂Φ/∂W_n, ∂Φ/∂b_{n+1} in :meth:`phi_parameters` order (see the module doc)."""
        layers = [x] + list(state)
        batch = x.shape[0]
        out = []
        for n in range(len(layers) - 1):
            if n < self.n_conv:
                u = self._unpooled_at(n, layers[n], layers[n + 1])
                out.append(self._conv_weight_grad(n, layers[n], u) / batch)
                out.append(u.sum(dim=(0, 2, 3)) / batch)
            else:
                out.append(self.flatten(layers[n + 1]).T @ self.flatten(layers[n]) / batch)
                out.append(layers[n + 1].mean(dim=0))
        return out

    @torch.no_grad()
    def accumulate_dphi_dtheta_difference_(self, x: torch.Tensor, state_a: list[torch.Tensor],
                                           state_b: list[torch.Tensor], scale: float) -> None:
        """θ.grad += scale · (∂Φ/∂θ(x, s_a, θ) − ∂Φ/∂θ(x, s_b, θ)) (batch mean), straight into ``.grad``.

        EP's one-sided estimate is  grad = −Δθ = (1/β)(∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β)):  s_a = s*, s_b = s^β.
        For W_0 the input and the argmax of z_0 are shared, so its term is one weight gradient of
        P_0ᵀ(s¹_a − s¹_b) against x. Above, the two states' argmaxes differ: one weight gradient over
        the stacked batch [s_a; s_b] against [U_a; −U_b].
        """
        layers_a = [x] + list(state_a)
        layers_b = [x] + list(state_b)
        c = scale / x.shape[0]
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            if n == 0:
                u = self._unpooled_at(0, x, layers_a[1] - layers_b[1])
                grad_of(w).add_(self._conv_weight_grad(0, x, u), alpha=c)
                grad_of(b).add_(u.sum(dim=(0, 2, 3)), alpha=c)
            elif n < self.n_conv:
                u_a = self._unpooled_at(n, layers_a[n], layers_a[n + 1])
                u_b = self._unpooled_at(n, layers_b[n], layers_b[n + 1])
                below = torch.cat([layers_a[n], layers_b[n]])
                grad_of(w).add_(self._conv_weight_grad(n, below, torch.cat([u_a, -u_b])), alpha=c)
                grad_of(b).add_(u_a.sum(dim=(0, 2, 3)) - u_b.sum(dim=(0, 2, 3)), alpha=c)
            else:
                grad_of(w).addmm_(layers_a[n + 1].T, self.flatten(layers_a[n]), alpha=c)
                grad_of(w).addmm_(layers_b[n + 1].T, self.flatten(layers_b[n]), alpha=-c)
                grad_of(b).add_(layers_a[n + 1].sum(dim=0) - layers_b[n + 1].sum(dim=0), alpha=c)

    # ------------------------------------------------------------------ dynamics (hot path)

    @torch.no_grad()
    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """The first layer's bottom-up term, a·P_0(W_0 ⋆ x + b_1) + c: it depends on x only.

        Computed once per batch and shared by every phase; only the top-down terms change.
        """
        a, c = self.act.scale, self.act.shift
        return self._pool(0, self._conv(0, x))[0].mul(a).add_(c)

    def _relax_constants(self, drive: torch.Tensor, n_layers: int, beta: float,
                         target: torch.Tensor | None) -> list[torch.Tensor]:
        """The step-independent part of every z^n: the drive at n = 1, a·b_n + c above it (per
        channel for conv layers), plus a·β·y at n = N for a nudged MSE read-out (nudged before σ)."""
        a, c = self.act.scale, self.act.shift
        const = [drive]
        for n in range(1, n_layers):
            b = self.biases[n] * a + c
            const.append(b.view(-1, 1, 1) if n < self.n_conv else b)
        if beta != 0.0 and target is not None and not self.softmax_readout and not self.nudges_after_activation:
            const[-1] = const[-1] + (a * beta) * target
        return const

    def _schedule(self, order: str, n_layers: int) -> tuple[tuple[range, range], tuple[range, range]]:
        """(convolutions, state layers) of the two halves of a step, 0-based (state layer i is
        s^{i+1}, convolution n reads s^n = state[n − 1]). ``sync``: everything in the first half."""
        convs = range(1, self.n_conv)
        if order == "sync":
            return (convs, range(n_layers)), (range(0), range(0))
        if order == "async":  # s¹, s³, … then s², s⁴, …; W_n ⋆ s^n before the half that updates s^{n+1}
            return (convs[1::2], range(0, n_layers, 2)), (convs[0::2], range(1, n_layers, 2))
        raise ValueError(f"order must be 'sync' or 'async', got {order!r}")

    @torch.no_grad()
    def relax(self, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float = 0.0,
              target: torch.Tensor | None = None, order: str = "sync", tol: float = 0.0,
              check_every: int = 5, tol_scope: str = "batch") -> list[torch.Tensor]:
        """Run up to ``steps`` steps of the (nudged if β ≠ 0) dynamics, updating ``state`` in place.

        ``drive`` is :meth:`input_drive` of the batch. One step, all layers synchronously from
        s_t (a = σ's scale, c = its shift); first, for every conv layer n ≥ 1, one bias-free
        convolution and its pooling, v_n, i_n = P_n(W_n ⋆ s^n) (bias and max/avg pooling commute)::

            z^n = [drive at n = 1 | a·v_{n−1} + (a·b_n + c) | a·(W_{n−1} s^{n−1}) + (a·b_n + c)]
                  + a·[W_nᵀ ⋆ P_nᵀ(s^{n+1}; i_n) | reshape(W_nᵀ s^{n+1})]   [+ a·β·∂(−ℓ)/∂s^N at n = N]
            s^n_{t+1} = g(z^n)                                          [+ β(y − s^N_t) at n = N instead,
                                                                         with ``nudge: post_activation``]

        The constants a·b_n + c and a·β·y are computed once here, not per step; steps alternate
        between ``state`` and a scratch set, so a step allocates no state.

        ``order: async`` is the even/odd schedule of Scellier et al. 2023: s¹, s³, … (state[0],
        state[2], …) from s_t, then s², s⁴, … from s' = (those fresh layers, the others at s_t)
        (Φ − βℓ in place of Φ when nudged)::

            s^n_{t+1} = σ(∂Φ/∂s^n(x, s_t))     n odd      (first half)
            s^n_{t+1} = σ(∂Φ/∂s^n(x, s'))      n even     (second half; s'^m = s^m_{t+1} for odd m, s^m_t for even m)

        A fixed point of either schedule is a fixed point of the other. The convolution of conv
        layer n reads s^n and feeds two terms: v_n is the bottom-up term of s^{n+1}, i_n (the
        argmax at z_n = W_n ⋆ s^n + b_{n+1}) routes the top-down term into s^n itself. Each must
        come from the s^n that its update reads::

            n even: v_n, i_n = P_n(W_n ⋆ s^n_t)        before the first half (s^n is s^n_t in s_t and s')
            n odd:  v_n, i_n = P_n(W_n ⋆ s^n_{t+1})    after the first half: v_n for s^{n+1} (even) now,
                                                       i_n for s^n (odd) in the first half of step t + 1

        so a step still runs one convolution per conv layer n ≥ 1; with max pooling, i_n of the
        odd layers is computed once more before the first step, at s^n_0. The nudge reads s^N_t
        in either half (s^N has not moved before its own update).

        ``tol`` > 0 stops early once a step changes no state by ``tol`` or more (max |s_{t+1} − s_t|
        over layers, and over examples with ``tol_scope`` "batch", or per example with "example";
        read every ``check_every`` steps: the only host synchronisation of the loop; with
        "example", see :func:`~eprun.nets.early_stop.relax_each_example`). ``self.last_relax_steps``
        holds the steps taken (with "example", their mean over the examples).
        """
        if tol > 0.0 and check_tol_scope(tol_scope) == "example":
            return relax_each_example(self, drive, state, steps, beta, target, order, tol, check_every)
        a = self.act.scale
        n_layers, n_conv = len(state), self.n_conv
        batch = state[0].shape[0]
        nudged = beta != 0.0 and target is not None
        after = nudged and self.nudges_after_activation
        const = self._relax_constants(drive, n_layers, beta, target)
        products = RelaxProducts.of_run()  # train.precision's products (float32 unless bf16)
        weights_t = [products.weight(w.T) if n >= n_conv else None for n, w in enumerate(self.weights)]
        down_weights = self._top_down_weights()
        fc_down = [products.weight(w) if n >= n_conv else None for n, w in enumerate(down_weights)]
        (first_convs, first_layers), (second_convs, second_layers) = self._schedule(order, n_layers)
        kernels = ConvKernels(self, state, down_weights, products)
        cur, nxt = kernels.state_buffers(state)
        if 0 in kernels.channels_last:
            const[0] = const[0].contiguous(memory_format=torch.channels_last)
        pooled: list = [None] * n_layers  # v_n: the bottom-up term of s^{n+1}
        indices: list = [None] * n_layers  # i_n: routes the top-down term into s^n

        def update(i: int, src: list[torch.Tensor], out: torch.Tensor) -> None:
            """s^{i+1} ← g(z^{i+1}) into ``out``, its neighbours from ``src``, v_i and i_{i+1} as last convolved."""
            if i == 0 and n_conv > 1 and kernels.first_layer_fused(const[0], src[1], indices[1], out):
                return
            if i < n_conv:  # conv state: a·v_i + (a·b + c), or the drive at i = 0
                if i + 1 < n_conv:  # conv above: + a·W_{i+1}ᵀ ⋆ P_{i+1}ᵀ(s^{i+2})
                    down = kernels.top_down(i + 1, src[i + 1], indices[i + 1])
                    if i == 0:
                        torch.add(const[0], down, alpha=a, out=out)
                    else:
                        torch.add(const[i], pooled[i].add_(down), alpha=a, out=out)
                else:  # fc (or nothing) above: + a·reshape(W_{i+1}ᵀ s^{i+2})
                    if i == 0:
                        out.copy_(const[0])
                    else:
                        torch.add(const[i], pooled[i], alpha=a, out=out)
                    if i + 1 < n_layers:
                        products.addmm_(out.view(batch, -1), src[i + 1], fc_down[i + 1], a)
            else:  # fc state: a·(W_i s^i) + (a·b + c) + a·(W_{i+1}ᵀ s^{i+2})
                products.addmm(const[i], self.flatten(src[i - 1]), weights_t[i], a, out)
                if i + 1 < n_layers:
                    products.addmm_(out, src[i + 1], fc_down[i + 1], a)
            if nudged and i == n_layers - 1 and not after:
                self.nudge_(out, cur[i], beta, target)
            self.act.apply_to_affine_(out)
            if after and i == n_layers - 1:  # σ(z^N) + β(y − s^N_t)
                out.add_(target, alpha=beta).add_(cur[i], alpha=-beta)

        for n in second_convs:  # i_n at s^n_0 for the first half of the first step
            if self.pools[n] == "max":
                pooled[n], indices[n] = kernels.convolve(n, state[n - 1])
        taken = 0
        for _ in range(steps):
            stopping.check()
            for n in first_convs:
                pooled[n], indices[n] = kernels.convolve(n, cur[n - 1])
            for i in first_layers:
                update(i, cur, nxt[i])
            for n in second_convs:  # s^n of these is fresh in nxt
                pooled[n], indices[n] = kernels.convolve(n, nxt[n - 1])
            for i in second_layers:  # the neighbours of these layers are fresh in nxt
                update(i, nxt, nxt[i])
            cur, nxt = nxt, cur
            taken += 1
            if tol > 0.0 and taken % check_every == 0 and largest_change(cur, nxt) < tol:
                break
        self.note_relax(taken, kernels.engine)
        for s, new in zip(state, cur):
            if new is not s:
                s.copy_(new)
        return state

    def step(self, x: torch.Tensor, state: list[torch.Tensor], beta: float = 0.0,
             target: torch.Tensor | None = None, input_term=None) -> list[torch.Tensor]:
        """One step, out of place and autograd-friendly: s_{t+1} = σ(∂Φ/∂s − β ∂ℓ/∂s)
        (σ(∂Φ/∂s) − β ∂ℓ/∂s with ``nudge: post_activation``).

        Used by BPTT (with ``input_term`` computed once per batch) and as the readable
        reference of :meth:`relax`.
        """
        return self.activate_nudged(self.dphi_ds(x, state, input_term), state, beta, target)

    # ------------------------------------------------------------------ feed-forward twin (BP baseline)

    def feedforward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s^{n+1} = σ(P_n(W_n ⋆ s^n + b_{n+1})) for conv layers, σ(W_n s^n + b_{n+1}) above: the feed-forward CNN."""
        h = x
        state = []
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            if n < self.n_conv:
                h = self.act(self._pool(n, self._conv(n, h))[0])
            else:
                h = self.act(self.flatten(h) @ w.T + b)
            state.append(h)
        return state

    def describe(self) -> str:
        """e.g. ``1x28x28 c32-c64 fc10``."""
        body = "-".join(f"c{w.shape[0]}" for w in list(self.weights)[:self.n_conv])
        fc = "-".join(str(s[0]) for s in self.state_shapes[self.n_conv:])
        return f"{'x'.join(map(str, self.input_shape))} {body}" + (f" fc{fc}" if fc else "")

    def weight_products(self, batch: int) -> WeightProducts:
        """P_j = B·C_{j+1}·C_j·k_j²·H'_j·W'_j for conv layer j (H'_j × W'_j: the convolution's output,
        before pooling), B·|s^j|·|s^{j+1}| for a fully connected one."""
        products, is_conv = [], []
        for j, w in enumerate(self.weights):
            positions = math.prod(self.conv_hw[j]) if j < self.n_conv else 1
            products.append(batch * w.numel() * positions)
            is_conv.append(j < self.n_conv)
        return WeightProducts(tuple(products), tuple(is_conv))
