"""The energy-based (discretised continuous Hopfield) fully connected EP network of Ernoult et al. 2019.

Layers s = (s¹ … s^N), static input x = s⁰, activation ρ, step size ε (``dt``). Input seen by
the first layer: x̃ = ρ(x) when ``input_rho`` (the default, as in the paper's code), else x.

**Primitive function.** The paper writes the dynamics as s_{t+1} = ∂Φ_ε/∂s with::

    Φ_ε(x, s, θ) = ½(1−ε)‖s‖² + ε·( Σ_n ρ(s^{n+1})·W_n ρ(s^n) + Σ_n b_n·ρ(s^n) [+ Σ_n ½ ρ(s^n)ᵀ L_n ρ(s^n)] )

(ρ(s⁰) read as x̃; the L_n terms are the optional symmetric, zero-diagonal lateral connections).
This network's :meth:`phi` is **Φ = Φ_ε / ε**, so that ∂Φ/∂θ carries no ε::

    Φ(x, s, θ) = ½(1/ε − 1)‖s‖² + Σ_n ρ(s^{n+1})·(W_n ρ(s^n) + b_{n+1}) [+ Σ_n ½ ρ(s^n)ᵀ L_n ρ(s^n)]

and one step, nudged with the MSE loss ℓ = ½‖y − s^N‖², is::

    s_{t+1} = ε·∂(Φ − βℓ)/∂s = ∂(Φ_ε − εβℓ)/∂s
    s^n_{t+1} = s^n + ε(−s^n + ρ'(s^n) ⊙ (W_{n−1} ρ(s^{n−1}) + W_nᵀ ρ(s^{n+1}) + b_n [+ L_n ρ(s^n)]))
                                                            [+ εβ(y − s^N) at n = N]

followed by clamping every state to [0, 1] when ``clamp`` (as in the paper's EB rows).
These are exactly the paper's dynamics, nudge εβ(y − s^N) included, with the paper's β.

*Why Φ_ε/ε.* The EP theorem for s_{t+1} = ∂Φ_ε/∂s − β'∂ℓ/∂s gives
∇_θ L ≈ (1/β')(∂Φ_ε/∂θ(s*) − ∂Φ_ε/∂θ(s^β')). The paper's nudge is β' = εβ, so
∇_θ L ≈ (1/β)(∂(Φ_ε/ε)/∂θ(s*) − ∂(Φ_ε/ε)/∂θ(s^β)): with Φ = Φ_ε/ε the unchanged EP rule
(``rules/ep.py``, which divides by the rule's β) estimates the loss gradient itself — the
same scale as BPTT and as the BP baseline — with the paper's β and the paper's learning
rates (its code's update, (1/β)(ρ(s^β)ρ(s^β)ᵀ − ρ(s*)ρ(s*)ᵀ), has no ε either). Keeping
ε in ∂Φ/∂θ while nudging by εβ would make EP's estimate ε·∇_θ L instead.

The closed forms::

    ∂Φ/∂W_n = ρ(s^{n+1}) ρ(s^n)ᵀ      ∂Φ/∂b_n = ρ(s^n)      ∂Φ/∂L_n = ½ ρ(s^n)ρ(s^n)ᵀ ⊙ (1 − I)

**Conventions.** ρ'(s) of the hard sigmoids is a·1[0 ≤ a·s ≤ 1], boundaries *included* (as
in the paper's code): with ``clamp`` and s_0 = 0 a state sitting at 0 must be able to move,
and torch's autograd of ``clamp`` gives 0 there. :meth:`phi`'s autograd therefore agrees with
the closed forms away from the kinks only (the tests use interior states).

**Read-out.** MSE only: the prediction is s^N, the loss ½‖y − s^N‖². ``readout: softmax``
is rejected by ``check()``.

**Lateral connections** (``lateral: true``): every hidden layer gets a symmetric,
zero-diagonal L_n inside Φ. :meth:`phi` uses sym(L_n) ⊙ (1 − I), so its autograd gradient
is symmetric with a zero diagonal; L_n starts symmetric with a zero diagonal and every update
keeps it so. L_n is in the same learning-rate group as W_{n−1} (the weights into layer n).
The NeurIPS 2019 toy model (Fig. 2: 5-50-10, tanh, ε = 0.08, β = 0.01, T = 5000, K = 80,
batch 1, no clamping) is ``hidden: [50], activation: tanh, dt: 0.08, clamp: false,
lateral: true``.

**Feed-forward twin** (``rule.kind: bp``): s^{n+1} = ρ(W_n ρ̃(s^n) + b_{n+1}) bottom-up, with
ρ̃(s⁰) = x̃ (the same input the energy net sees) and ρ̃ = ρ above; the laterals are unused.

The hot path (:meth:`relax`) is closed form: no autograd, the input drive W_0 x̃ + b_1
computed once per batch, every state updated in place, scratch buffers reused across steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

import torch
from torch import nn

from eprun import stopping
from eprun.nets.activations import ActivationName
from eprun.nets.base import ModelConfig, dense_chain_problems
from eprun.nets.dense import DenseChainNetwork, chain_pre_activations, dense_weight_products
from eprun.nets.parameters import grad_of, per_layer, uniform_parameter
from eprun.nets.relax_products import RelaxProducts
from eprun.nets.products import add_outer_, linear
from eprun.native import energy as native_energy


@dataclass
class EnergyMLPConfig(ModelConfig):
    """``model:`` section for ``kind: energy_mlp`` (MSE read-out only)."""

    kind: str = "energy_mlp"
    hidden: list[int] = field(default_factory=lambda: [512])
    activation: ActivationName = "sigmoid"
    dt: float = 0.2
    clamp: bool = True
    input_rho: bool = True
    lateral: bool = False
    readout: Literal["mse", "softmax"] = "mse"
    weight_scale: Union[float, list[float]] = 1.0

    def check(self):
        yield from dense_chain_problems(self.hidden, self.weight_scale, "[512]")
        if not 0.0 < self.dt <= 1.0:
            yield "dt", f"the step size ε must be in (0, 1], got {self.dt}"
        if self.readout != "mse":
            yield "readout", "the energy-based net supports only the MSE read-out (readout: mse)"


class EnergyMLP(DenseChainNetwork):
    """Fully connected net with the energy-based EP dynamics and a feed-forward twin (MSE read-out only)."""

    Config = EnergyMLPConfig

    def __init__(self, cfg: EnergyMLPConfig, input_shape: tuple[int, ...], num_classes: int,
                 generator: torch.Generator):
        if cfg.readout != "mse":
            raise ValueError("energy_mlp supports only readout: mse")
        super().__init__(cfg, input_shape, num_classes, generator)  # W_n, b_{n+1}: the MLP's draws
        self.eps = float(cfg.dt)
        self.nudge_scale = self.eps  # the nudge is εβ(y − s^N): neural updates are divided by εβ (see eprun.gdu)
        scales = per_layer(cfg.weight_scale, self.layer_count(cfg))
        # lateral L for state layer i (0-based) = hidden layer i+1, i = 0 … N−2, drawn after the chain
        self.laterals = nn.ParameterList()
        if cfg.lateral:
            for i, size in enumerate(cfg.hidden):
                upper = torch.triu(uniform_parameter((size, size), size, scales[i], generator).data, diagonal=1)
                self.laterals.append(nn.Parameter(upper + upper.T))

    # ------------------------------------------------------------------ structure

    def _lateral(self, i: int) -> nn.Parameter | None:
        """L of state layer i (0-based), or None."""
        return self.laterals[i] if len(self.laterals) and i < len(self.laterals) else None

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped by weight layer, in order; L_n joins W_{n−1}'s group."""
        groups = super().layer_groups()
        for i, lat in enumerate(self.laterals):
            groups[i].append(lat)
        return groups

    def phi_parameters(self) -> list[nn.Parameter]:
        """θ of Φ in the order :meth:`dphi_dtheta` returns: W_0, b_1, W_1, b_2, …, then L_1, L_2, …"""
        return super().phi_parameters() + list(self.laterals)

    # ------------------------------------------------------------------ ρ, ρ' (out of place)

    def rho_input(self, x: torch.Tensor) -> torch.Tensor:
        """x̃: the input as the first layer sees it, ρ(x) if ``input_rho`` else x (flattened)."""
        x = self.flatten(x)
        return self.act(x) if self.cfg.input_rho else x

    def rho_prime(self, s: torch.Tensor) -> torch.Tensor:
        """ρ'(s), out of place; hard sigmoids: a·1[0 ≤ a·s ≤ 1], boundaries included."""
        a, name = self.act.scale, self.act.name
        if name == "sigmoid":
            r = self.act(s)
            return a * r * (1 - r)
        if name == "tanh":
            return 1 - torch.tanh(s) ** 2
        z = s * a + self.act.shift
        return a * ((z >= 0) & (z <= 1)).to(s.dtype)

    def _sym_lateral(self, lat: torch.Tensor) -> torch.Tensor:
        """sym(L) ⊙ (1 − I): the lateral matrix as Φ uses it (equals L when L is symmetric, zero-diagonal)."""
        eye = torch.eye(lat.shape[0], dtype=torch.bool, device=lat.device)
        return (0.5 * (lat + lat.T)).masked_fill(eye, 0.0)

    # ------------------------------------------------------------------ Φ and its closed-form derivatives

    def phi(self, x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """Φ = Φ_ε/ε, one value per example (autograd oracle)."""
        r = [self.rho_input(x)] + [self.act(s) for s in state]
        total = 0.5 * (1.0 / self.eps - 1.0) * sum((s * s).sum(dim=1) for s in state)
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            total = total + (r[n + 1] * (r[n] @ w.T + b)).sum(dim=1)
        for i, lat in enumerate(self.laterals):
            total = total + 0.5 * ((r[i + 1] @ self._sym_lateral(lat)) * r[i + 1]).sum(dim=1)
        return total

    def _interaction(self, x: torch.Tensor, state: list[torch.Tensor],
                     input_term: torch.Tensor | None = None) -> list[torch.Tensor]:
        """h^n = W_{n−1} ρ(s^{n−1}) + W_nᵀ ρ(s^{n+1}) + b_n [+ L_n ρ(s^n)], out of place; ``input_term``,
        if given, is :meth:`input_term` of x (W_0 x̃ + b_1, computed once)."""
        r = [self.rho_input(x)] + [self.act(s) for s in state]
        out = chain_pre_activations(self, r, list(self.weights)[1:], input_term)  # the dense chain's terms
        for i, lat in enumerate(self.laterals):
            out[i] = out[i] + r[i + 1] @ self._sym_lateral(lat)  # + L_n ρ(s^n), state layer i = hidden layer i+1
        return out

    def input_term(self, x: torch.Tensor) -> torch.Tensor:
        """W_0 x̃ + b_1: the part of the first layer's interaction that depends on the static input
        only (autograd-friendly)."""
        return self.rho_input(x) @ self.weights[0].T + self.biases[0]

    def dphi_ds(self, x: torch.Tensor, state: list[torch.Tensor],
                input_term: torch.Tensor | None = None) -> list[torch.Tensor]:
        """∂Φ/∂s^n = (1/ε − 1) s^n + ρ'(s^n) ⊙ h^n, per layer (closed form)."""
        c = 1.0 / self.eps - 1.0
        return [c * s + self.rho_prime(s) * h for s, h in zip(state, self._interaction(x, state, input_term))]

    def dphi_dtheta(self, x: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Batch mean of ∂Φ/∂W_n = ρ(s^{n+1})ρ(s^n)ᵀ, ∂Φ/∂b_{n+1} = ρ(s^{n+1}) and ∂Φ/∂L_n.

        In :meth:`phi_parameters` order; no ε factor (Φ = Φ_ε/ε).
        """
        r = [self.rho_input(x)] + [self.act(s) for s in state]
        batch = r[0].shape[0]
        out = []
        for n in range(len(r) - 1):
            out.append(r[n + 1].T @ r[n] / batch)
            out.append(r[n + 1].mean(dim=0))
        for i in range(len(self.laterals)):
            g = 0.5 * (r[i + 1].T @ r[i + 1]) / batch
            out.append(g.fill_diagonal_(0.0))
        return out

    @torch.no_grad()
    def accumulate_dphi_dtheta_difference_(self, x: torch.Tensor, state_a: list[torch.Tensor],
                                           state_b: list[torch.Tensor], scale: float) -> None:
        """θ.grad += scale · (∂Φ/∂θ(x, s_a, θ) − ∂Φ/∂θ(x, s_b, θ)) (batch mean), straight into ``.grad``.

        EP's one-sided estimate is  grad = −Δθ = (1/β)(∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β)):  s_a = s*, s_b = s^β.
        For W_0 the input is shared, so its term is one product: (ρ(s¹_a) − ρ(s¹_b))ᵀ x̃.
        """
        xr = self.rho_input(x)
        ra = [xr] + [self.act(s) for s in state_a]
        rb = [xr] + [self.act(s) for s in state_b]
        c = scale / xr.shape[0]
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            diff = ra[n + 1] - rb[n + 1]
            if n == 0:
                add_outer_(grad_of(w), diff, xr, c)
            else:
                grad_of(w).addmm_(ra[n + 1].T, ra[n], alpha=c)
                grad_of(w).addmm_(rb[n + 1].T, rb[n], alpha=-c)
            grad_of(b).add_(diff.sum(dim=0), alpha=c)
        for i, lat in enumerate(self.laterals):
            g = torch.mm(ra[i + 1].T, ra[i + 1]).mul_(0.25 * c)
            g.addmm_(rb[i + 1].T, rb[i + 1], alpha=-0.25 * c)
            # ½(g + gᵀ) is bitwise symmetric (matmul round-off is not), so L stays exactly symmetric
            grad_of(lat).add_(g.add_(g.T.clone()).fill_diagonal_(0.0))

    # ------------------------------------------------------------------ dynamics (hot path)

    def _relax_buffers(self, state: list[torch.Tensor]) -> dict:
        ref = state[0]
        key = (ref.shape[0], ref.dtype, ref.device)
        if key not in self._scratch:  # one set per batch size (the last batch may be smaller)
            self._scratch[key] = {
                "r": [torch.empty_like(s) for s in state],  # ρ(s)
                "d": [torch.empty_like(s) for s in state],  # ρ'(s) up to a constant factor
                "h": [torch.empty_like(s) for s in state],  # interaction term
                "shift": ref.new_tensor(self.act.shift),
                "one": ref.new_tensor(1.0),
            }
        return self._scratch[key]

    def _rho_and_slope_(self, s: torch.Tensor, r: torch.Tensor, d: torch.Tensor, buf: dict) -> float:
        """r ← ρ(s), d ← ρ'(s)/k in place; return k (so that ρ'(s) = k·d)."""
        a, name = self.act.scale, self.act.name
        if name == "sigmoid":
            torch.add(buf["shift"], s, alpha=a, out=r).sigmoid_()
            torch.addcmul(r, r, r, value=-1.0, out=d)  # r(1 − r)
            return a
        if name == "tanh":
            torch.tanh(s, out=r)
            torch.addcmul(buf["one"], r, r, value=-1.0, out=d)  # 1 − r²
            return 1.0
        # hard sigmoids: r = clamp(a·s + c, 0, 1), d = 1[0 ≤ a·s + c ≤ 1] (boundaries included)
        torch.add(buf["shift"], s, alpha=a, out=d)
        torch.clamp(d, 0.0, 1.0, out=r)
        d.eq_(r)
        return a

    @torch.no_grad()
    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """The constant part of the first layer's interaction, W_0 x̃ + b_1 (once per batch)."""
        return linear(self.rho_input(x), self.weights[0], self.biases[0])

    @torch.no_grad()
    def relax(self, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float = 0.0,
              target: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Run ``steps`` steps of the (nudged if β ≠ 0) dynamics, updating ``state`` in place.

        ``drive`` is :meth:`input_drive` of the batch. One step, all layers synchronously from s_t::

            r^n = ρ(s^n), d^n = ρ'(s^n)                      (all layers first)
            h^n = W_{n−1} r^{n−1} + W_nᵀ r^{n+1} + b_n [+ L_n r^n]     (h¹ starts from the drive)
            s^n ← (1 − ε) s^n + ε d^n ⊙ h^n  [− εβ s^N + εβ y at n = N],  then clamp to [0, 1]

        The products W r are the run's precision's (:class:`~eprun.nets.relax_products.RelaxProducts`).
        """
        eps = self.eps
        n_layers = len(state)
        nudged = beta != 0.0 and target is not None
        products = RelaxProducts.of_run()
        if products.exact and self._relax_native(drive, state, steps, beta if nudged else 0.0,
                                                 target if nudged else None):
            return state
        buf = self._relax_buffers(state)
        r, d, h = buf["r"], buf["d"], buf["h"]
        weights = [products.weight(w) for w in self.weights]
        weights_t = [products.weight(w.T) for w in self.weights]
        biases = list(self.biases)
        laterals = [products.weight(self._lateral(i)) for i in range(n_layers)]
        decay = [1.0 - eps] * n_layers
        pull = None
        if nudged:
            decay[-1] = 1.0 - eps - eps * beta
            pull = target * (eps * beta)
        clamp = self.cfg.clamp
        for _ in range(steps):
            stopping.check()
            for i in range(n_layers):
                slope = self._rho_and_slope_(state[i], r[i], d[i], buf)  # the same k for every layer
            for i in range(n_layers):
                out = h[i]
                if i == 0:
                    if n_layers > 1:
                        products.addmm(drive, r[1], weights[1], 1.0, out)
                    else:
                        out.copy_(drive)
                else:
                    products.addmm(biases[i], r[i - 1], weights_t[i], 1.0, out)
                    if i + 1 < n_layers:
                        products.addmm_(out, r[i + 1], weights[i + 1])
                if laterals[i] is not None:
                    products.addmm_(out, r[i], laterals[i])  # L symmetric: ρ(s) Lᵀ = ρ(s) L
                s = state[i]
                s.mul_(decay[i]).addcmul_(d[i], out, value=eps * slope)
                if pull is not None and i == n_layers - 1:
                    s.add_(pull)
                if clamp:
                    s.clamp_(0.0, 1.0)
        self.note_relax(steps, "torch")
        return state

    def _relax_native(self, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float,
                      target: torch.Tensor | None) -> bool:
        """:meth:`relax` through the compiled kernel (:mod:`eprun.native.energy`) where it applies
        (no lateral connections, CPU float32); False, having done nothing, elsewhere."""
        if any(self._lateral(i) is not None for i in range(len(state))):
            return False
        slope = 1.0 if self.act.name == "tanh" else self.act.scale  # ρ'(s) = slope·d(s), as _rho_and_slope_
        weights = [w.detach() for w in self.weights]
        biases = [b.detach() for b in self.biases]
        if not native_energy.relax_energy(state, drive, biases, weights, target, self.act.name, self.act.scale,
                                          self.act.shift, slope, self.eps, beta, self.cfg.clamp, steps):
            return False
        self.note_relax(steps, "native")
        return True

    def step(self, x: torch.Tensor, state: list[torch.Tensor], beta: float = 0.0,
             target: torch.Tensor | None = None, input_term: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One step, out of place and autograd-friendly: s_{t+1} = ε·∂(Φ − βℓ)/∂s, then clamp.

        Used by BPTT (with ``input_term`` computed once per batch) and as the readable reference
        of :meth:`relax`.
        """
        eps = self.eps
        new = [eps * g for g in self.dphi_ds(x, state, input_term)]
        if beta != 0.0 and target is not None:
            new[-1] = new[-1] + (eps * beta) * (target - state[-1])
        if self.cfg.clamp:
            new = [s.clamp(0.0, 1.0) for s in new]
        return new

    # ------------------------------------------------------------------ feed-forward twin (BP baseline)

    def feedforward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s^{n+1} = ρ(W_n ρ̃(s^n) + b_{n+1}) bottom-up, ρ̃(s⁰) = x̃, ρ̃ = ρ above; no laterals."""
        h = self.rho_input(x)
        state = []
        for n, (w, b) in enumerate(zip(self.weights, self.biases)):
            s = self.act(h @ w.T + b)
            state.append(s)
            h = self.act(s)
        return state

    def describe(self) -> str:
        return "-".join(map(str, self.sizes)) + " EB"

    def weight_products(self, batch: int):
        dense = dense_weight_products(self.sizes, batch)
        laterals = tuple(batch * lat.shape[0] ** 2 for lat in self.laterals)
        return type(dense)(dense.products, dense.is_conv, laterals)
