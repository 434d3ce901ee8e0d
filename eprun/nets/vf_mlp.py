"""The prototypical fully connected net with separate forward and backward weights ("vector field").

Scellier et al. 2018 (vector-field EP), Ernoult et al. 2020 (arXiv:2005.04168, VF and C-VF).
Layers s = (s¹ … s^N), static input x = s⁰. Parameters: forward weights W_n (layer n → n+1,
shape |s^{n+1}| × |s^n|), biases b_{n+1}, n = 0 … N−1, and backward weights B_n (layer n+1 → n,
shape |s^n| × |s^{n+1}|), n = 1 … N−1 (the input is clamped, so there is no B_0). The dynamics::

    s^n_{t+1} = σ(W_{n−1} s^{n−1}_t + B_n s^{n+1}_t + b_n)            [+ β(y − s^N) at n = N]

is :class:`~eprun.nets.mlp.PrototypicalMLP`'s with W_nᵀ replaced by B_n. When B_n ≠ W_nᵀ it
derives from no primitive function Φ: it is a vector field, not a gradient. The nudge and the
read-outs (MSE on s^N, or softmax(W_out s^N + b_out) outside the dynamics) are the MLP's.

Initial angle. ``initial_angle: α`` (degrees) builds each B_n from W_nᵀ and a random matrix R
made orthogonal to W_nᵀ in the Frobenius inner product (Gram–Schmidt)::

    R⊥  = R − (⟨R, W_nᵀ⟩ / ‖W_n‖²) W_nᵀ
    B_n = cos(α) W_nᵀ + sin(α) ‖W_n‖ R⊥ / ‖R⊥‖

so ‖B_n‖ = ‖W_n‖ and the angle between vec(B_n) and vec(W_nᵀ) is exactly α. α = 0 gives
B_n = W_nᵀ, and then the dynamics are exactly the prototypical MLP's. W, b (and the read-out)
are drawn first, in the MLP's order, so a ``vf_mlp`` and an ``mlp`` with the same seed and
sizes start from the same W; R is drawn after them, for every α (an angle sweep with one
seed shares R). :meth:`angles` measures the angles during training.

The VF update (MISSION.md: "the update of a layer uses (s^β_post − s*_post)·s_preᵀ"), with s*
the free state and s^β the nudged one, batch means::

    ΔW_n     = (1/β) (s^{n+1,β} − s^{n+1,*}) s^{n,*ᵀ}        post n+1, pre n
    ΔB_n     = (1/β) (s^{n,β}   − s^{n,*})   s^{n+1,*ᵀ}      post n,   pre n+1
    Δb_{n+1} = (1/β) (s^{n+1,β} − s^{n+1,*})

Each weight moves with the change of its post-synaptic unit times its pre-synaptic unit at the
free state: local in space, and defined whatever B is.

``nudged_update: per_step`` writes instead, for EP, the sum over the K nudged steps of each
step's increment, V(s_k, s_{k+1}) with s_0 = s* (C-VF's increments, applied once after the
phase rather than at each step)::

    ΔW_n = (1/β) Σ_k (s^{n+1}_{k+1} − s^{n+1}_k) s^{nᵀ}_k          (B_n, b_{n+1} alike)

It differs from the end-point update by (1/β) Σ_k (s^{n+1}_{k+1} − s^{n+1}_k)(s^n_k − s^n_0)ᵀ,
O(β) (the pre-synaptic units move by O(β) during the phase), and not at all for W_0 and the
biases. The authors' code (``ernoult/continualEP``) applies this sum by default and the
end-point update with ``--former`` (recipes/README.md, VF rows).

``same_update: true`` ties the two directions: W_n and B_n both receive the symmetrised
update U_n = ΔW_n + ΔB_nᵀ (B_n gets U_nᵀ), so B_n − W_nᵀ never changes under SGD and a net
started at α = 0 stays symmetric. With B_n = W_nᵀ this *is* EP to first order in β (see
:meth:`accumulate_dphi_dtheta_difference_`). Applying ΔW_n alone to both (B's update = ΔW_nᵀ)
would keep the symmetry too, but it drops the s^{n+1} (ds^n)ᵀ half of EP's update of the
tied weight, so it is not EP at α = 0; the sum is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from eprun.nets.backward_weights import FeedbackWeights, angle_degrees, backward_at_angle
from eprun.nets.dense import (DenseChainNetwork, chain_pre_activations, dense_constants, dense_feedforward,
                              dense_weight_products)
from eprun.nets.dense_relax import ep_phases_dense, relax_dense_
from eprun.nets.mlp import MLPConfig
from eprun.nets.parameters import grad_of, parameters_in
from eprun.nets.products import add_outer_, linear
from eprun.nets.relax_products import RelaxProducts
from eprun.nets.vf_cep import continual_nudged_phase_vf_


@dataclass
class VFMLPConfig(MLPConfig):
    """``model:`` section for ``kind: vf_mlp``: ``mlp``'s keys plus the backward weights' set-up."""

    kind: str = "vf_mlp"
    initial_angle: float = 0.0  # degrees between vec(B_n) and vec(W_nᵀ) at initialisation
    same_update: bool = False  # tie the updates: W_n gets ΔW_n + ΔB_nᵀ, B_n its transpose
    # EP's update from the phases' end points, or the sum of the K nudged steps' increments
    nudged_update: Literal["endpoints", "per_step"] = "endpoints"

    def check(self):
        yield from super().check()
        if not 0.0 <= self.initial_angle <= 180.0:
            yield "initial_angle", f"an angle in degrees in [0, 180], got {self.initial_angle}"


class VectorFieldMLP(FeedbackWeights, DenseChainNetwork):
    """Fully connected net with the prototypical dynamics, forward weights W and backward weights B
    (B_n shaped as W_nᵀ)."""

    Config = VFMLPConfig
    has_phi = False  # B ≠ Wᵀ: a vector field

    def __init__(self, cfg: VFMLPConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        super().__init__(cfg, input_shape, num_classes, generator)  # W, b as the MLP's: same seed, same W
        self.nudges_after_activation = cfg.nudge == "post_activation"  # model.nudge: β(y − s^N) after σ
        self.same_update = bool(cfg.same_update)
        self.accumulates_nudged_steps = cfg.nudged_update == "per_step"
        # backward weights: feedback[n − 1] is B_n, n = 1 … N−1
        self.feedback = nn.ParameterList()
        for n in range(1, len(self.weights)):
            noise = torch.randn(self.weights[n].T.shape, generator=generator, dtype=torch.float64)
            self.feedback.append(nn.Parameter(backward_at_angle(self.weights[n], cfg.initial_angle, noise)))

    # ------------------------------------------------------------------ structure

    @torch.no_grad()
    def angles(self) -> dict[str, float]:
        """Angle in degrees between vec(B_n) and vec(W_nᵀ), per layer: ``{"B1": …, "B2": …}``."""
        return {f"B{n}": angle_degrees(self.backward_weight(n), self.weights[n].T)
                for n in range(1, len(self.weights))}

    # ------------------------------------------------------------------ the vector field and the VF update

    def pre_activations(self, x: torch.Tensor, state: list[torch.Tensor],
                        input_term: torch.Tensor | None = None) -> list[torch.Tensor]:
        """W_{n−1} s^{n−1} + B_n s^{n+1} + b_n per layer: the role ∂Φ/∂s plays in the MLP (no Φ here)."""
        layers = [self.flatten(x)] + list(state)
        return chain_pre_activations(self, layers, [b.T for b in self.feedback], input_term)  # M_n = B_nᵀ

    def vf_update(self, x: torch.Tensor, state_a: list[torch.Tensor],
                  state_b: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The "pseudo ∂Φ/∂θ difference" V(a, b), batch means, by parameter name (readable reference)::

            V_{W_n}(a, b)     = (s^{n+1}_a − s^{n+1}_b) s^{n}_aᵀ
            V_{b_{n+1}}(a, b) = s^{n+1}_a − s^{n+1}_b
            V_{B_n}(a, b)     = (s^{n}_a − s^{n}_b) s^{n+1}_aᵀ

        With ``same_update`` W_n gets V_{W_n} + V_{B_n}ᵀ and B_n its transpose.
        """
        layers_a = [self.flatten(x)] + list(state_a)
        layers_b = [layers_a[0]] + list(state_b)
        batch = layers_a[0].shape[0]
        diff = [a - b for a, b in zip(layers_a, layers_b)]  # diff[0] = 0: the input is clamped
        out = {}
        for n in range(len(self.weights)):
            out[f"weights.{n}"] = diff[n + 1].T @ layers_a[n] / batch
            out[f"biases.{n}"] = diff[n + 1].mean(dim=0)
        for n in range(1, len(self.weights)):
            out[f"feedback.{n - 1}"] = diff[n].T @ layers_a[n + 1] / batch
        if self.same_update:
            for n in range(1, len(self.weights)):
                tied = out[f"weights.{n}"] + out[f"feedback.{n - 1}"].T
                out[f"weights.{n}"], out[f"feedback.{n - 1}"] = tied, tied.T
        return out

    @torch.no_grad()
    def accumulate_dphi_dtheta_difference_(self, x: torch.Tensor, state_a: list[torch.Tensor],
                                           state_b: list[torch.Tensor], scale: float,
                                           skip_input_layer: bool = False) -> None:
        """θ.grad += scale · V(a, b), the VF update, in place (the interface EP's rule calls);
        ``skip_input_layer``: W_0 and b_1 left alone (see ``linear_input_drive``).

        The net has no Φ; the name is the EP interface's. What is written is the "pseudo
        ∂Φ/∂θ difference" V(a, b) of :meth:`vf_update`: for each weight, the difference of its
        post-synaptic units between the states a and b times its pre-synaptic units *at a*::

            W_n.grad     += scale · (s^{n+1}_a − s^{n+1}_b) s^{n}_aᵀ
            b_{n+1}.grad += scale · (s^{n+1}_a − s^{n+1}_b)
            B_n.grad     += scale · (s^{n}_a − s^{n}_b) s^{n+1}_aᵀ

        It is *not* "f(a) − f(b)" of one function f: (s^{n+1} s^{nᵀ})(a) − (s^{n+1} s^{nᵀ})(b)
        would use each state's own pre-synaptic units; the VF update uses s_a's for both.
        The rules pass the state to take the pre-synaptic units from as ``state_a``:

        * EP (``rules/ep.py``) calls it with (s*, s^β, 1/β): grad = −ΔW_n =
          (1/β)(s^{n+1,*} − s^{n+1,β}) s^{n,*ᵀ}, the VF update of the module docstring.
        * C-EP / C-VF (``rules/cep.py``) calls it at each nudged step with (s_t, s_{t+1}, 1/β):
          the increment (η/β)(s^{post}_{t+1} − s^{post}_t) s^{pre ᵀ}_t of C-VF.

        Reduction to EP. For a PrototypicalMLP (Φ = Σ s^{n+1}·(W_n s^n + b_{n+1})), with
        Δ = s_a − s_b::

            ∂Φ/∂W_n(a) − ∂Φ/∂W_n(b) = s^{n+1}_a s^{nᵀ}_a − s^{n+1}_b s^{nᵀ}_b
                                    = V_{W_n}(a, b) + V_{B_n}(a, b)ᵀ − Δ^{n+1} Δ^{nᵀ}

        (expand s_b = s_a − Δ). With B_n = W_nᵀ (``initial_angle: 0``) the dynamics are the
        MLP's, and with ``same_update`` W_n receives V_{W_n} + V_{B_n}ᵀ: EP's update up to
        scale·Δ^{n+1}Δ^{nᵀ} = (1/β)·O(β²) = O(β). Biases and W_0 (the input is clamped, Δ⁰ = 0)
        get exactly EP's update at any β, with or without ``same_update``. Without it, W_n
        (n ≥ 1) gets V_{W_n} alone, which differs from EP's update at O(1).
        """
        layers_a = [self.flatten(x)] + list(state_a)
        layers_b = [layers_a[0]] + list(state_b)
        c = scale / layers_a[0].shape[0]
        diff_post_prev = None  # s^n_a − s^n_b of the layer below (None for the clamped input)
        for n, (w, b) in enumerate(zip(parameters_in(self.weights), parameters_in(self.biases))):
            diff_post = layers_a[n + 1] - layers_b[n + 1]
            if n == 0 and skip_input_layer:
                diff_post_prev = diff_post
                continue
            grad_of(b).add_(diff_post.sum(dim=0), alpha=c)  # s^{n+1}_a − s^{n+1}_b
            if n >= 1 and self.same_update:  # tied: W_n and B_nᵀ both get V_{W_n} + V_{B_n}ᵀ
                tied = torch.mm(diff_post.T, layers_a[n]).addmm_(layers_a[n + 1].T, diff_post_prev)
                grad_of(w).add_(tied, alpha=c)
                grad_of(self.backward_weight(n)).add_(tied.T, alpha=c)
            else:
                add_outer_(grad_of(w), diff_post, layers_a[n], c)  # (s^{n+1}_a − s^{n+1}_b) s^{nᵀ}_a
                if n >= 1:  # (s^n_a − s^n_b) s^{n+1 ᵀ}_a
                    grad_of(self.backward_weight(n)).addmm_(diff_post_prev.T, layers_a[n + 1], alpha=c)
            diff_post_prev = diff_post

    # ------------------------------------------------------------------ dynamics (hot path)

    linear_input_drive = True

    def input_layer(self, x: torch.Tensor) -> tuple[torch.Tensor, nn.Parameter, nn.Parameter, float]:
        """(x flattened, W_0, b_1, a): the drive is a·(x W_0ᵀ + b_1) + c."""
        return self.flatten(x), self.weights[0], self.biases[0], self.act.scale

    @torch.no_grad()
    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """The constant part of the first layer's pre-activation, a·(W_0 x + b_1) + c, once per batch."""
        a, c = self.act.scale, self.act.shift
        return linear(self.flatten(x), self.weights[0], self.biases[0]).mul_(a).add_(c)

    @torch.no_grad()
    def relax(self, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float = 0.0,
              target: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run ``steps`` steps of the (nudged if β ≠ 0) dynamics, updating ``state`` in place.

        ``drive`` is :meth:`input_drive` of the batch. One step, all layers synchronously from
        s_t (a = σ's scale, c = its shift)::

            z^n = a·(W_{n−1} s^{n−1} + B_n s^{n+1} + b_n) + c  [+ a·β(y − s^N) at n = N]
            s^n_{t+1} = g(z^n)

        The MLP's loop with W_nᵀ replaced by B_n; constants computed once per call.
        """
        const = dense_constants(self, drive, len(state), beta, target)
        bottom_up = [w.T for w in parameters_in(self.weights)]  # s^{n−1} @ W_{n−1}ᵀ = (W_{n−1} s^{n−1})ᵀ
        top_down = [f.T for f in parameters_in(self.feedback)]  # s^{n+1} @ B_nᵀ = (B_n s^{n+1})ᵀ; B_n = feedback[n − 1]
        return relax_dense_(self, const, state, self.scratch_states(state), bottom_up, top_down, steps, beta, target)

    @torch.no_grad()
    def continual_nudged_phase_(self, x: torch.Tensor, drive: torch.Tensor, free: list[torch.Tensor], steps: int,
                                beta: float, target: torch.Tensor, y: torch.Tensor, rate) -> bool:
        """C-VF's nudged phase with W_nᵀ and B_nᵀ held as contiguous copies that each step's increment
        goes straight into (:mod:`eprun.nets.vf_cep`); not with ``same_update``, and float32
        products only (the run's precision, :class:`~eprun.nets.relax_products.RelaxProducts`)."""
        if self.same_update or not RelaxProducts.of_run().exact:
            return False
        continual_nudged_phase_vf_(self, self.flatten(x), drive, free, steps, beta, target, y, rate)
        return True

    @torch.no_grad()
    def ep_phases(self, drive: torch.Tensor, labels: torch.Tensor, free_steps: int, nudged_steps: int, beta: float,
                  **schedule):
        """The free phase and the one-sided nudged phase in one call of the compiled kernel, when it
        applies (see :func:`eprun.nets.dense_relax.ep_phases_dense`): (s*, s^β, loss at s*, mean steps
        per phase), else None. The same steps as :meth:`relax`; U_i = W_{i−1}, D_i = B_{i+1}ᵀ."""
        up = [None] + parameters_in(self.weights)[1:]
        down = [f.T.contiguous() for f in parameters_in(self.feedback)] + [None]
        return ep_phases_dense(self, drive, labels, free_steps, nudged_steps, beta, up, down, **schedule)

    def step(self, x: torch.Tensor, state: list[torch.Tensor], beta: float = 0.0,
             target: torch.Tensor | None = None, input_term=None) -> list[torch.Tensor]:
        """One step, out of place and autograd-friendly: s^n_{t+1} = σ(W_{n−1}s^{n−1} + B_n s^{n+1} + b_n − β∂ℓ/∂s^n).

        Used by BPTT and as the readable reference of :meth:`relax` (``input_term``, if given, is
        :meth:`input_term` of x: W_0 x + b_1, computed once).
        """
        return self.activate_nudged(self.pre_activations(x, state, input_term), state, beta, target)

    def input_term(self, x: torch.Tensor) -> torch.Tensor:
        """W_0 x + b_1: the part of a step that depends on the static input only (autograd-friendly)."""
        return self.flatten(x) @ self.weights[0].T + self.biases[0]

    # ------------------------------------------------------------------ feed-forward twin (BP baseline)

    def feedforward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s^{n+1} = σ(W_n s^n + b_{n+1}) bottom-up with the forward weights only."""
        return dense_feedforward(self, x)

    def describe(self) -> str:
        return "-".join(map(str, self.sizes)) + " VF"

    def weight_products(self, batch: int):
        return dense_weight_products(self.sizes, batch)

