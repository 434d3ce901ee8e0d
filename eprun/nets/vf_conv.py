"""The prototypical conv net with separate forward and backward weights ("vector field").

Laborieux et al. 2021 (arXiv:2006.03824, "VF": ``--model VFCNN``), after Ernoult et al. 2020
(arXiv:2005.04168). :class:`~eprun.nets.conv.ConvNet` with every weight layer n ≥ 1 (conv or
fc; the input is clamped, so there is no B_0) given a backward weight B_n of W_n's shape, used
*only* in the top-down term into s^n, where ConvNet uses W_n::

    s^n_{t+1} = σ( P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n)  +  B_nᵀ ⋆ P_nᵀ(s^{n+1}) )        (conv above)
    s^n_{t+1} = σ( P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n)  +  reshape(B_nᵀ s^{n+1}) )       (fc above)

B_nᵀ ⋆ is the transposed convolution with B_n's kernel; P_nᵀ is ConvNet's pooling adjoint, its
max-pool argmax taken at z_n = W_n ⋆ s^n + b_{n+1} (the forward weights), as in ConvNet. When
B_n ≠ W_n this derives from no primitive function Φ: it is a vector field, not a gradient, so
``has_phi`` is False and :meth:`phi`, :meth:`dphi_ds`, :meth:`dphi_dtheta` and
:meth:`phi_parameters` raise. The nudge and the read-outs (MSE on s^N, or softmax(W_out s^N + b_out) outside the
dynamics) are ConvNet's; the read-out has no backward weight.

Initial angle. ``initial_angle: α`` (degrees) builds each B_n from W_n exactly as
:class:`~eprun.nets.vf_mlp.VectorFieldMLP` does (:func:`~eprun.nets.backward_weights.backward_at_angle`
on vec(W_n))::

    R⊥  = R − (⟨R, W_n⟩ / ‖W_n‖²) W_n
    B_n = cos(α) W_n + sin(α) ‖W_n‖ R⊥ / ‖R⊥‖

so ‖B_n‖ = ‖W_n‖ and the angle between vec(B_n) and vec(W_n) is exactly α. α = 0 gives B_n = W_n,
and then the dynamics are exactly ConvNet's. W, b (and the read-out) are drawn first, in
ConvNet's order, so a ``vf_conv`` and a ``conv`` with the same seed and shapes start from the
same W; R ~ N(0, 1) is drawn after them, layer by layer, for every α. :meth:`angles` measures
the angles during training.

The VF update (MISSION.md: "the update of a layer uses (s^β_post − s*_post)·s_preᵀ"), with s*
the free state, s^β the nudged one, Δ^n = s^{n,β} − s^{n,*}, U_n(v) = P_nᵀ(v) with P_n's argmax
at z_n(s^{n,*}), G_n(input, grad_output) = ``torch.nn.grad.conv2d_weight`` (Σ_batch
∂(grad_output · (K ⋆ input))/∂K), batch means::

    ΔW_n     = (1/β) G_n(s^{n,*}, U_n(Δ^{n+1}))           post n+1, pre n     (conv)
    ΔB_n     = (1/β) G_n(Δ^n, U_n(s^{n+1,*}))             post n,   pre n+1   (conv)
    ΔW_n     = (1/β) Δ^{n+1} s^{n,*ᵀ},   ΔB_n = (1/β) s^{n+1,*} Δ^{nᵀ}          (fc, B_n shaped as W_n)
    Δb_{n+1} = (1/β) Σ_positions U_n(Δ^{n+1})   (conv),   (1/β) Δ^{n+1}   (fc)

ΔB_n is the gradient w.r.t. B_n of Σ Δ^n · (B_nᵀ ⋆ U_n(s^{n+1,*})), the top-down term B_n feeds
weighted by the change of its post-synaptic layer: the transposed convolution is the adjoint
of the convolution (⟨d, Kᵀ ⋆ u⟩ = ⟨K ⋆ d, u⟩), so its kernel gradient is ``conv2d_weight`` with
the roles swapped (input d, grad_output u).

``same_update: true`` ties the two directions as :class:`~eprun.nets.vf_mlp.VectorFieldMLP`
does: W_n and B_n both receive U_n = ΔW_n + ΔB_n (same shapes here, no transpose), so B_n − W_n
never changes under SGD and a net started at α = 0 stays symmetric. With B_n = W_n this is EP
to first order in β (:meth:`accumulate_dphi_dtheta_difference_`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eprun.nets.backward_weights import FeedbackWeights, angle_degrees, backward_at_angle
from eprun.nets.conv import ConvConfig, ConvNet
from eprun.nets.parameters import grad_of


@dataclass
class VFConvConfig(ConvConfig):
    """``model:`` section for ``kind: vf_conv``: ``conv``'s keys plus the backward weights' set-up."""

    kind: str = "vf_conv"
    initial_angle: float = 0.0  # degrees between vec(B_n) and vec(W_n) at initialisation
    same_update: bool = False  # tie the updates: W_n and B_n both get ΔW_n + ΔB_n

    def check(self):
        yield from super().check()
        if not 0.0 <= self.initial_angle <= 180.0:
            yield "initial_angle", f"an angle in degrees in [0, 180], got {self.initial_angle}"


class VectorFieldConvNet(FeedbackWeights, ConvNet):
    """ConvNet's dynamics with backward weights B_n (shaped as W_n) in the top-down terms; trained
    by the VF update."""

    Config = VFConvConfig
    has_phi = False  # B ≠ W: a vector field

    def __init__(self, cfg: VFConvConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        super().__init__(cfg, input_shape, num_classes, generator)  # W, b, read-out: ConvNet's draws
        self.same_update = bool(cfg.same_update)
        # backward weights: feedback[n − 1] is B_n (W_n's shape), n = 1 … N−1
        self.feedback = nn.ParameterList()
        for n in range(1, len(self.weights)):
            w = self.weights[n]
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float64)
            b = backward_at_angle(w.detach().reshape(-1, 1), cfg.initial_angle, noise.reshape(1, -1))
            self.feedback.append(nn.Parameter(b.reshape(w.shape).contiguous()))

    # ------------------------------------------------------------------ structure

    @torch.no_grad()
    def angles(self) -> dict[str, float]:
        """Angle in degrees between vec(B_n) and vec(W_n), per layer: ``{"B1": …, "B2": …}``."""
        return {f"B{n}": angle_degrees(self.backward_weight(n), self.weights[n])
                for n in range(1, len(self.weights))}

    def describe(self) -> str:
        return super().describe() + " VF"

    # ------------------------------------------------------------------ no Φ (ConvNet's would ignore B)

    def phi(self, x, state):
        raise NotImplementedError(self._no_phi())

    def dphi_ds(self, x, state, input_term=None):
        raise NotImplementedError(self._no_phi() + "; pre_activations() gives the vector field")

    def dphi_dtheta(self, x, state):
        raise NotImplementedError(self._no_phi() + "; its update is the VF update of accumulate_dphi_dtheta_difference_()")

    # ------------------------------------------------------------------ the vector field and the VF update

    def _conv_t_back(self, n: int, u: torch.Tensor) -> torch.Tensor:
        """B_nᵀ ⋆ u: the transposed convolution with the backward kernel, back to s^n's size."""
        return F.conv_transpose2d(u, self.backward_weight(n), None, self.strides[n], self.paddings[n],
                                  self.output_paddings[n])

    def _back_weight_grad(self, n: int, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Σ_batch ∂(d · (B_nᵀ ⋆ u))/∂B_n = conv2d_weight(input=d, grad_output=u) (adjointness)."""
        return torch.nn.grad.conv2d_weight(d, self.backward_weight(n).shape, u, self.strides[n],
                                           self.paddings[n])

    def pre_activations(self, x: torch.Tensor, state: list[torch.Tensor],
                        input_term: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Bottom-up P_{n−1}(W_{n−1} ⋆ s^{n−1} + b_n) (or W s + b) + top-down with B_n, per layer (no Φ
        here); ``input_term``, if given, is :meth:`input_term` of x, computed once."""
        layers = [x] + list(state)
        out, indices = self._bottom_up(layers, input_term)  # forward W, remembering every pool's argmax
        for n in range(1, len(layers) - 1):  # top-down from s^{n+1} into s^n through B_n
            above = layers[n + 1]
            if n < self.n_conv:  # B_nᵀ ⋆ P_nᵀ(s^{n+1})
                td = self._conv_t_back(n, self._unpool(n, above, indices[n]))
            else:  # reshape(B_nᵀ s^{n+1})
                td = (self.flatten(above) @ self.backward_weight(n)).reshape(layers[n].shape)
            out[n - 1] = out[n - 1] + td
        return out

    def vf_update(self, x: torch.Tensor, state_a: list[torch.Tensor],
                  state_b: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The "pseudo ∂Φ/∂θ difference" V(a, b), batch means, by parameter name (readable reference).

        With d^n = s^n_a − s^n_b and U_n(v) = P_nᵀ(v) at z_n(s^n_a)::

            V_{W_n} = G_n(s^n_a, U_n(d^{n+1}))    V_{B_n} = G_n(d^n, U_n(s^{n+1}_a))    (conv)
            V_{W_n} = d^{n+1} s^{nᵀ}_a             V_{B_n} = s^{n+1}_a d^{nᵀ}             (fc)
            V_{b_{n+1}} = Σ_positions U_n(d^{n+1})  (conv),  d^{n+1}  (fc)

        With ``same_update`` W_n and B_n both get V_{W_n} + V_{B_n}.
        """
        layers_a = [x] + list(state_a)
        layers_b = [x] + list(state_b)
        batch = x.shape[0]
        diff = [a - b for a, b in zip(layers_a, layers_b)]
        out = {}
        for n in range(len(self.weights)):
            if n < self.n_conv:
                u = self._unpooled_at(n, layers_a[n], diff[n + 1])
                out[f"weights.{n}"] = self._conv_weight_grad(n, layers_a[n], u) / batch
                out[f"biases.{n}"] = u.sum(dim=(0, 2, 3)) / batch
                if n >= 1:
                    u_a = self._unpooled_at(n, layers_a[n], layers_a[n + 1])
                    out[f"feedback.{n - 1}"] = self._back_weight_grad(n, diff[n], u_a) / batch
            else:
                out[f"weights.{n}"] = diff[n + 1].T @ self.flatten(layers_a[n]) / batch
                out[f"biases.{n}"] = diff[n + 1].mean(dim=0)
                out[f"feedback.{n - 1}"] = self.flatten(layers_a[n + 1]).T @ self.flatten(diff[n]) / batch
        if self.same_update:
            for n in range(1, len(self.weights)):
                tied = out[f"weights.{n}"] + out[f"feedback.{n - 1}"]
                out[f"weights.{n}"], out[f"feedback.{n - 1}"] = tied, tied.clone()
        return out

    @torch.no_grad()
    def accumulate_dphi_dtheta_difference_(self, x: torch.Tensor, state_a: list[torch.Tensor],
                                           state_b: list[torch.Tensor], scale: float) -> None:
        """θ.grad += scale · V(a, b), the VF update of :meth:`vf_update`, in place (EP's interface).

        The net has no Φ; the name is the EP interface's. As in VectorFieldMLP, each weight gets
        the difference of its post-synaptic units between a and b times its pre-synaptic units
        *at a* (and, for max pooling, P_n's argmax at z_n(s^n_a)). EP (``rules/ep.py``) calls it
        with (s*, s^β, 1/β), or (s^{−β}, s^β, 1/2β) for the symmetric estimator.

        Reduction to EP. ConvNet's ∂Φ/∂W_n(s) = G_n(s^n, U_n(s^{n+1})) is bilinear in (s^n, s^{n+1})
        once the argmax is fixed, so with d = s_a − s_b and the same argmax at a and b::

            ∂Φ/∂W_n(a) − ∂Φ/∂W_n(b) = V_{W_n}(a, b) + V_{B_n}(a, b) − G_n(d^n, U_n(d^{n+1}))

        (the fc case likewise with products). With B_n = W_n (``initial_angle: 0``) the dynamics
        are ConvNet's, and with ``same_update`` W_n receives V_{W_n} + V_{B_n}: EP's update up to
        (1/β)·O(β²) = O(β) (for small β the argmax at s^β and s* agree). W_0 (the input is
        clamped, d⁰ = 0, shared argmax) and the biases (unpooling preserves the window sums) get
        exactly EP's update at any β. Without ``same_update``, W_n alone differs from EP at O(1);
        W_n.grad + B_n.grad is EP's to O(β).
        """
        layers_a = [x] + list(state_a)
        layers_b = [x] + list(state_b)
        c = scale / x.shape[0]
        diff_prev = None  # s^n_a − s^n_b of the layer below (None for the clamped input)
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            diff = layers_a[n + 1] - layers_b[n + 1]
            if n < self.n_conv:
                if self.pools[n] == "max":  # argmax at z_n(s^n_a), shared by both unpoolings
                    indices = self._pool(n, self._conv(n, layers_a[n]))[1]
                else:
                    indices = None
                u = self._unpool(n, diff, indices)
                grad_of(b).add_(u.sum(dim=(0, 2, 3)), alpha=c)
                if n == 0:
                    grad_of(w).add_(self._conv_weight_grad(0, x, u), alpha=c)
                else:
                    u_a = self._unpool(n, layers_a[n + 1], indices)
                    if self.same_update:  # one weight gradient over the stacked batch: W- and B-terms summed
                        tied = self._conv_weight_grad(n, torch.cat([layers_a[n], diff_prev]), torch.cat([u, u_a]))
                        grad_of(w).add_(tied, alpha=c)
                        grad_of(self.backward_weight(n)).add_(tied, alpha=c)
                    else:
                        grad_of(w).add_(self._conv_weight_grad(n, layers_a[n], u), alpha=c)
                        grad_of(self.backward_weight(n)).add_(self._back_weight_grad(n, diff_prev, u_a), alpha=c)
            else:
                pre = self.flatten(layers_a[n])
                grad_of(b).add_(diff.sum(dim=0), alpha=c)
                if n >= 1 and self.same_update:
                    tied = torch.mm(diff.T, pre).addmm_(layers_a[n + 1].T, self.flatten(diff_prev))
                    grad_of(w).add_(tied, alpha=c)
                    grad_of(self.backward_weight(n)).add_(tied, alpha=c)
                else:
                    grad_of(w).addmm_(diff.T, pre, alpha=c)  # d^{n+1} s^{nᵀ}_a
                    if n >= 1:  # s^{n+1}_a d^{nᵀ}
                        grad_of(self.backward_weight(n)).addmm_(layers_a[n + 1].T, self.flatten(diff_prev), alpha=c)
            diff_prev = diff

    # ------------------------------------------------------------------ dynamics (hot path)

    def _conv_t_down(self, n: int, u: torch.Tensor) -> torch.Tensor:
        """The top-down transposed convolution into s^n goes through B_n (ConvNet's relax uses it)."""
        return self._conv_t_back(n, u)

    def _top_down_weights(self) -> list[torch.Tensor]:
        """The top-down weights of ConvNet's relax: B_n for n ≥ 1 (no B_0: the input is clamped)."""
        return [None] + [self.backward_weight(n) for n in range(1, len(self.weights))]

    def step(self, x: torch.Tensor, state: list[torch.Tensor], beta: float = 0.0,
             target: torch.Tensor | None = None, input_term=None) -> list[torch.Tensor]:
        """One step, out of place and autograd-friendly: s_{t+1} = σ(pre_activations − β ∂ℓ/∂s)
        (the nudge after σ with ``nudge: post_activation``, as ConvNet's).

        Used by BPTT and as the readable reference of :meth:`relax`.
        """
        return self.activate_nudged(self.pre_activations(x, state, input_term), state, beta, target)

    # feedforward (forward weights W only), input_drive, init_state, target, logits, loss and
    # accumulate_readout_grad_ are ConvNet's.
