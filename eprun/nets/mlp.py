"""The prototypical (discrete-time) fully connected EP network of Ernoult et al. 2019.

Layers s = (s¹ … s^N), static input x = s⁰, parameters θ = (W_n, b_{n+1}), n = 0 … N−1.

Primitive function (per example)::

    Φ(x, s, θ) = Σ_n s^{n+1} · (W_n s^n + b_{n+1})

Free dynamics ``s_{t+1} = σ(∂Φ/∂s(x, s_t, θ))``, i.e. for every layer at once::

    s^n_{t+1} = σ(W_{n−1} s^{n−1}_t + W_nᵀ s^{n+1}_t + b_n)

Nudged dynamics add −β ℓ(s^N, y) to Φ. With the MSE loss ℓ = ½‖y − s^N‖² this adds
β (y − s^N) to the output layer's pre-activation; ``nudge: post_activation`` adds it after σ
instead, s^N_{t+1} = σ(z^N) + β(y − s^N_t), as the authors' ``EPdisc.stepper`` does (the two forms:
:mod:`eprun.nets.conv`). With ``readout: softmax`` (Laborieux et al.
2021) the last layer of Φ is the last hidden layer and the prediction is
softmax(W_out s^N + b_out), a read-out outside Φ; the nudge on s^N is β W_outᵀ (y − p).

The hot path (:meth:`relax`) is closed form: no autograd, the drive from the static input
``W_0 x + b_1`` computed once per phase, scratch buffers reused across steps.
:meth:`phi` exists as the oracle the tests differentiate with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import nn

from eprun.native import dense as native_dense
from eprun.nets.activations import ActivationName
from eprun.nets.base import ModelConfig, dense_chain_problems
from eprun.nets.dense import (DenseChainNetwork, chain_pre_activations, dense_constants, dense_feedforward,
                              dense_weight_products)
from eprun.nets.dense_cep import continual_nudged_phase_dense_
from eprun.nets.dense_relax import ep_phases_dense, relax_dense_
from eprun.nets.parameters import grad_of, parameters_in
from eprun.nets.products import add_outer_, linear
from eprun.nets.relax_products import RelaxProducts


@dataclass
class MLPConfig(ModelConfig):
    """``model:`` section for ``kind: mlp``."""

    kind: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [512])
    activation: ActivationName = "sigmoid"
    readout: Literal["mse", "softmax"] = "mse"
    weight_scale: Union[float, list[float]] = 1.0
    #: where the nudged phase adds β(y − s^N): to the output's pre-activation (Φ − βℓ) or after σ, as
    #: the authors' ``EPdisc.stepper`` does (eprun/nets/conv.py's docstring)
    nudge: Literal["pre_activation", "post_activation"] = "pre_activation"

    def check(self):
        yield from dense_chain_problems(self.hidden, self.weight_scale, "[512]")
        if self.nudge == "post_activation" and self.readout != "mse":
            yield "nudge", "post_activation nudges the output layer s^N after σ: it needs readout: mse"


class PrototypicalMLP(DenseChainNetwork):
    """Fully connected net with the prototypical EP dynamics and a feed-forward twin."""

    relax_schedules = True  # relax() takes order / tol / check_every / tol_scope
    Config = MLPConfig

    def __init__(self, cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        super().__init__(cfg, input_shape, num_classes, generator)
        self.nudges_after_activation = cfg.nudge == "post_activation"  # model.nudge: β(y − s^N) after σ

    # ------------------------------------------------------------------ Φ and its closed-form derivatives

    def phi(self, x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """Φ(x, s, θ) = Σ_n s^{n+1}·(W_n s^n + b_{n+1}), one value per example (autograd oracle)."""
        layers = [self.flatten(x)] + list(state)
        total = 0.0
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            total = total + (layers[n + 1] * (layers[n] @ w.T + b)).sum(dim=1)
        return total

    def input_term(self, x: torch.Tensor) -> torch.Tensor:
        """W_0 x + b_1: the part of ∂Φ/∂s¹ that depends on the static input only (autograd-friendly)."""
        return self.flatten(x) @ self.weights[0].T + self.biases[0]

    def dphi_ds(self, x: torch.Tensor, state: list[torch.Tensor],
                input_term: torch.Tensor | None = None) -> list[torch.Tensor]:
        """∂Φ/∂s^n = W_{n−1} s^{n−1} + b_n + W_nᵀ s^{n+1}, per layer (closed form); ``input_term``,
        if given, is :meth:`input_term` of x, computed once instead of at every call."""
        layers = [self.flatten(x)] + list(state)
        return chain_pre_activations(self, layers, list(self.weights)[1:], input_term)  # M_n = W_n

    def dphi_dtheta(self, x: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Batch mean of ∂Φ/∂W_n = s^{n+1} s^nᵀ and ∂Φ/∂b_{n+1} = s^{n+1}, in :meth:`phi_parameters` order."""
        layers = [self.flatten(x)] + list(state)
        batch = layers[0].shape[0]
        out = []
        for n in range(len(layers) - 1):
            out.append(layers[n + 1].T @ layers[n] / batch)
            out.append(layers[n + 1].mean(dim=0))
        return out

    @torch.no_grad()
    def accumulate_dphi_dtheta_difference_(self, x: torch.Tensor, state_a: list[torch.Tensor],
                                           state_b: list[torch.Tensor], scale: float,
                                           skip_input_layer: bool = False) -> None:
        """θ.grad += scale · (∂Φ/∂θ(x, s_a, θ) − ∂Φ/∂θ(x, s_b, θ)) (batch mean), straight into ``.grad``.

        EP's one-sided estimate is  grad = −Δθ = (1/β)(∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β)):  s_a = s*, s_b = s^β.
        For W_0 the input is shared, so its term is one product: (s¹_a − s¹_b)ᵀ x.
        ``skip_input_layer``: W_0 and b_1 left alone (see ``linear_input_drive``).
        """
        weights, biases = parameters_in(self.weights), parameters_in(self.biases)
        x = self.flatten(x)
        c = scale / x.shape[0]
        if not skip_input_layer and native_dense.ep_dense_update(x, state_a, state_b, [grad_of(w) for w in weights],
                                                                 [grad_of(b) for b in biases], c):
            return
        layers_a = [x] + list(state_a)
        layers_b = [x] + list(state_b)
        for n, (w, b) in enumerate(zip(weights, biases)):
            if n == 0 and skip_input_layer:
                continue
            diff = layers_a[n + 1] - layers_b[n + 1]  # s^{n+1}_a − s^{n+1}_b
            if n == 0:
                add_outer_(grad_of(w), diff, layers_a[0], c)
            else:
                grad_of(w).addmm_(layers_a[n + 1].T, layers_a[n], alpha=c)
                grad_of(w).addmm_(layers_b[n + 1].T, layers_b[n], alpha=-c)
            grad_of(b).add_(diff.sum(dim=0), alpha=c)

    # ------------------------------------------------------------------ dynamics (hot path)

    linear_input_drive = True

    def input_layer(self, x: torch.Tensor) -> tuple[torch.Tensor, nn.Parameter, nn.Parameter, float]:
        """(x flattened, W_0, b_1, a): the drive is a·(x W_0ᵀ + b_1) + c."""
        return self.flatten(x), self.weights[0], self.biases[0], self.act.scale

    @torch.no_grad()
    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """The constant part of the first layer's pre-activation, a·(W_0 x + b_1) + c.

        The input is static, so this — most of the arithmetic of a step — is computed once
        per batch and shared by every phase.
        """
        a, c = self.act.scale, self.act.shift
        return linear(self.flatten(x), self.weights[0], self.biases[0]).mul_(a).add_(c)

    @torch.no_grad()
    def relax(self, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float = 0.0,
              target: torch.Tensor | None = None, order: str = "sync", tol: float = 0.0,
              check_every: int = 5, tol_scope: str = "batch") -> list[torch.Tensor]:
        """Run ``steps`` steps of the (nudged if β ≠ 0) dynamics, updating ``state`` in place.

        ``drive`` is :meth:`input_drive` of the batch. One step, all layers synchronously from
        s_t (a = σ's scale, c = its shift)::

            z^n = a·(W_{n−1} s^{n−1} + W_nᵀ s^{n+1} + b_n) + c  [+ a·β(y − s^N) at n = N]
            s^n_{t+1} = g(z^n)

        The constants a·b_n + c and a·β·y are computed once here, not per step. ``order``,
        ``tol``, ``check_every`` and ``tol_scope`` choose the schedule (see :func:`relax_dense_`).
        """
        const = dense_constants(self, drive, len(state), beta, target)
        weights = parameters_in(self.weights)
        bottom_up = [w.T for w in weights]  # s^{n−1} @ W_{n−1}ᵀ = (W_{n−1} s^{n−1})ᵀ
        top_down = weights[1:]  # s^{n+1} @ W_n = (W_nᵀ s^{n+1})ᵀ
        return relax_dense_(self, const, state, self.scratch_states(state), bottom_up, top_down, steps, beta, target,
                            order=order, tol=tol, check_every=check_every, tol_scope=tol_scope)

    @torch.no_grad()
    def ep_phases(self, drive: torch.Tensor, labels: torch.Tensor, free_steps: int, nudged_steps: int, beta: float,
                  **schedule):
        """EP's free phase (``free_steps`` from s = 0) and one-sided nudged phase (``nudged_steps``
        from s*) in one call of the compiled kernel, when it applies (see
        :func:`eprun.nets.dense_relax.ep_phases_dense`): (s*, s^β, loss at s*, mean steps per phase),
        else None. The same steps as :meth:`relax` for each phase; the kernel's U_i = W_{i−1}, D_i = W_i."""
        weights = parameters_in(self.weights)[1:]
        return ep_phases_dense(self, drive, labels, free_steps, nudged_steps, beta, [None] + weights, weights + [None],
                               **schedule)

    @torch.no_grad()
    def continual_nudged_phase_(self, x: torch.Tensor, drive: torch.Tensor, free: list[torch.Tensor], steps: int,
                                beta: float, target: torch.Tensor, y: torch.Tensor, rate) -> bool:
        """C-EP's nudged phase with every weight held as θ* plus its increments in factored form
        (:mod:`eprun.nets.dense_cep`: Φ is linear in θ, so the increments telescope); float32
        products only (the run's precision, :class:`~eprun.nets.relax_products.RelaxProducts`)."""
        if not RelaxProducts.of_run().exact:
            return False
        continual_nudged_phase_dense_(self, self.flatten(x), drive, free, steps, beta, target, y, rate)
        return True

    def step(self, x: torch.Tensor, state: list[torch.Tensor], beta: float = 0.0,
             target: torch.Tensor | None = None, input_term: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One step, out of place and autograd-friendly: s_{t+1} = σ(∂Φ/∂s − β ∂ℓ/∂s).

        Used by BPTT (with ``input_term`` computed once per batch) and as the readable
        reference of :meth:`relax`.
        """
        return self.activate_nudged(self.dphi_ds(x, state, input_term), state, beta, target)

    # ------------------------------------------------------------------ feed-forward twin (BP baseline)

    def feedforward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s^{n+1} = σ(W_n s^n + b_{n+1}) bottom-up: the equivalent feed-forward MLP."""
        return dense_feedforward(self, x)

    def describe(self) -> str:
        return "-".join(map(str, self.sizes))

    def weight_products(self, batch: int):
        return dense_weight_products(self.sizes, batch)

