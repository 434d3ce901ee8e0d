"""What the vector-field nets (:mod:`eprun.nets.vf_mlp`, :mod:`eprun.nets.vf_conv`) share about
their backward weights B_n: how B_n is drawn at a given angle to the forward weight, how that
angle is measured, and where B_n is held, grouped and logged (:class:`FeedbackWeights`)."""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import nn

from eprun.nets.layered import LayeredNetwork


def backward_at_angle(forward: torch.Tensor, degrees: float, noise: torch.Tensor) -> torch.Tensor:
    """B = cos(α) Wᵀ + sin(α) ‖W‖ R⊥/‖R⊥‖, R⊥ = ``noise`` made Frobenius-orthogonal to Wᵀ.

    Computed in float64 and returned in ``forward``'s dtype; α = 0 returns Wᵀ exactly.
    """
    wt = forward.detach().T.to(torch.float64)
    if degrees == 0.0:
        return wt.to(forward.dtype).contiguous()
    r = noise.to(torch.float64).clone()
    norm2 = (wt * wt).sum()
    for _ in range(2):  # Gram–Schmidt, twice for orthogonality to rounding ("twice is enough")
        r -= ((r * wt).sum() / norm2) * wt
    alpha = math.radians(degrees)
    b = math.cos(alpha) * wt + (math.sin(alpha) * norm2.sqrt() / r.norm()) * r
    return b.to(forward.dtype).contiguous()


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle between vec(a) and vec(b) in degrees, as atan2(‖a⊥‖·‖b‖, ⟨a, b⟩) (exact near 0 and 180)."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    nb2 = (b * b).sum()
    dot = (a * b).sum()
    perp = a - (dot / nb2) * b
    return math.degrees(math.atan2(float(perp.norm() * nb2.sqrt()), float(dot)))


class FeedbackWeights(LayeredNetwork):
    """A vector-field net's backward weights B_n, n = 1 … N−1 (none for the clamped input), held
    in ``feedback`` (``feedback[n − 1]`` is B_n) and trained at W_n's per-layer rate."""

    feedback: nn.ParameterList

    def backward_weight(self, n: int) -> nn.Parameter:
        """B_n, the top-down weight from s^{n+1} into s^n, n = 1 … N−1."""
        return self.feedback[n - 1]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Per weight layer n: [W_n, b_{n+1}] and B_n when it exists (n ≥ 1); then the read-out."""
        groups = super().layer_groups()
        for n in range(1, len(self.weights)):
            groups[n].append(self.backward_weight(n))
        return groups

    @abstractmethod
    def angles(self) -> dict[str, float]:
        """Angle in degrees between vec(B_n) and W_n's in B_n's layout, per layer: ``{"B1": …, "B2": …}``."""

    def monitor(self) -> dict[str, float]:
        """The angles of :meth:`angles`, logged as ``vf_angle_deg/B{n}``."""
        return {f"vf_angle_deg/{k}": v for k, v in self.angles().items()}
