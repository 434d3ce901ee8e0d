"""What the EP networks of this package share: weight layers W_n, b_{n+1}, an activation σ,
the read-out, and the scratch state buffers of their relaxations.

Read-out. MSE: the prediction is s^N, ℓ = ½‖y − s^N‖² with one-hot y, and the nudge adds
β(y − s^N) to the output layer's pre-activation. Softmax read-out (Laborieux et al. 2021): a
layer outside the dynamics, prediction p = softmax(W_out s^N + b_out), ℓ = cross-entropy, and
the nudge on s^N is −β ∂ℓ/∂s^N = β W_outᵀ (y − p); W_out is trained on the exact gradient of
ℓ at the free fixed point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eprun.nets.activations import ACTIVATIONS, Activation
from eprun.nets.base import EPNetwork
from eprun.nets.parameters import grad_of, uniform_parameter


class LayeredNetwork(EPNetwork):
    """An EP net of weight layers (``weights[n]`` = W_n, ``biases[n]`` = b_{n+1}, n = 0 … N−1)
    with activation ``act`` and, when ``softmax_readout``, ``readout_weight`` / ``readout_bias``."""

    def __init__(self, activation: str, num_classes: int, softmax_readout: bool):
        super().__init__()
        self.act: Activation = ACTIVATIONS[activation]
        self.num_classes = num_classes
        self.softmax_readout = softmax_readout
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self._scratch: dict = {}

    def add_readout(self, fan_in: int, scale: float, generator: torch.Generator) -> None:
        """The softmax read-out's W_out [classes, fan_in] and b_out, drawn after the layers."""
        self.readout_weight = uniform_parameter((self.num_classes, fan_in), fan_in, scale, generator)
        self.readout_bias = uniform_parameter((self.num_classes,), fan_in, 1.0, generator)

    # ------------------------------------------------------------------ parameters

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters grouped by weight layer, in order (for per-layer learning rates)."""
        groups = [[w, b] for w, b in zip(self.weights, self.biases)]
        if self.softmax_readout:
            groups.append([self.readout_weight, self.readout_bias])
        return groups

    def phi_parameters(self) -> list[nn.Parameter]:
        """θ of Φ in the order ``dphi_dtheta`` returns: W_0, b_1, W_1, b_2, …"""
        if not self.has_phi:
            raise NotImplementedError(self._no_phi())
        return [p for w, b in zip(self.weights, self.biases) for p in (w, b)]

    def state_bounds(self) -> tuple[float, float]:
        return self.act.bounds

    # ------------------------------------------------------------------ read-out

    @staticmethod
    def flatten(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)

    def target(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """One-hot targets in the state dtype (labels are checked against the class count when the
        data is loaded; ``scatter_`` still refuses an out-of-range index)."""
        return torch.zeros(y.shape[0], self.num_classes, dtype=like.dtype, device=like.device).scatter_(
            1, y.unsqueeze(1), 1.0)

    def logits(self, state: list[torch.Tensor]) -> torch.Tensor:
        """The prediction scores: s^N (MSE) or W_out s^N + b_out (softmax read-out, s^N flattened)."""
        if self.softmax_readout:
            return self.flatten(state[-1]) @ self.readout_weight.T + self.readout_bias
        return state[-1]

    def loss(self, state: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Per-example loss ℓ: ½‖y − s^N‖² (MSE) or cross-entropy of the softmax read-out."""
        out = self.logits(state)
        if self.softmax_readout:
            return F.cross_entropy(out, y, reduction="none")
        return 0.5 * ((self.target(y, out) - out) ** 2).sum(dim=1)

    @torch.no_grad()
    def accumulate_readout_grad_(self, state: list[torch.Tensor], y: torch.Tensor) -> None:
        """For the softmax read-out (outside Φ): W_out.grad += ∂ℓ/∂W_out = (p − y) s^Nᵀ (batch mean)."""
        if not self.softmax_readout:
            return
        s_last = self.flatten(state[-1])
        err = torch.softmax(self.logits(state), dim=1) - self.target(y, s_last)
        grad_of(self.readout_weight).addmm_(err.T, s_last, alpha=1.0 / s_last.shape[0])
        grad_of(self.readout_bias).add_(err.mean(dim=0))

    def nudge_(self, out: torch.Tensor, s_last: torch.Tensor, beta: float, target: torch.Tensor) -> None:
        """Add a·β·∂(−ℓ)/∂s^N to the output layer's pre-activation ``out`` (a = σ's scale; for
        MSE without the constant a·β·y, which the caller folds into the layer's constant)."""
        a = self.act.scale
        if self.softmax_readout:  # −∂ℓ/∂s^N = W_outᵀ (y − softmax(W_out s^N + b_out)), s^N flattened
            flat = self.flatten(s_last)
            p = torch.softmax(torch.addmm(self.readout_bias, flat, self.readout_weight.T), dim=1)
            out.view(flat.shape).addmm_(p - target, self.readout_weight, alpha=-a * beta)
        else:  # −∂ℓ/∂s^N = y − s^N
            out.add_(s_last, alpha=-a * beta)

    def activate_nudged(self, drive: list[torch.Tensor], state: list[torch.Tensor], beta: float,
                        target: torch.Tensor | None) -> list[torch.Tensor]:
        """σ of every layer's pre-activation ``drive`` at ``state``, nudged (β ≠ 0) before σ, or
        after it for a net that ``nudges_after_activation``: s^N_{t+1} = σ(z^N) + β(y − s^N_t)."""
        nudged = beta != 0.0 and target is not None
        if nudged and not self.nudges_after_activation:
            drive = self.nudged_drive(drive, state, beta, target)
        out = [self.act(d) for d in drive]
        if nudged and self.nudges_after_activation:
            out[-1] = out[-1] + beta * (target - state[-1])
        return out

    def nudged_drive(self, drive: list[torch.Tensor], state: list[torch.Tensor], beta: float,
                     target: torch.Tensor) -> list[torch.Tensor]:
        """``step``'s nudge, out of place: β·∂(−ℓ)/∂s^N added to the last layer's drive (no a:
        ``drive`` is before σ's affine part)."""
        drive = list(drive)
        s_last = state[-1]
        if self.softmax_readout:
            p = torch.softmax(self.logits(state), dim=1)
            drive[-1] = drive[-1] + (beta * (target - p) @ self.readout_weight).reshape(s_last.shape)
        else:
            drive[-1] = drive[-1] + beta * (target - s_last)
        return drive

    # ------------------------------------------------------------------ relaxation bookkeeping

    def scratch_states(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """A second set of state buffers per (batch size, dtype, device), for relaxations that
        alternate between two sets so that a step allocates nothing."""
        key = (state[0].shape[0], state[0].dtype, state[0].device)
        if key not in self._scratch:  # one set per batch size (the last batch may be smaller)
            self._scratch[key] = [torch.empty_like(s) for s in state]
        return self._scratch[key]

    def note_relax(self, steps: float, engine: str) -> None:
        """Record :attr:`last_relax_steps` / :attr:`last_relax_engine`, bypassing nn.Module's
        ``__setattr__`` (which searches the parameter, buffer and module tables first)."""
        object.__setattr__(self, "last_relax_steps", steps)
        object.__setattr__(self, "last_relax_engine", engine)
