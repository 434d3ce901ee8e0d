"""Activation functions σ of the EP papers, written as σ(x) = g(a·x + c).

Keeping the affine part (a, c) separate from the base non-linearity g lets the relaxation
fold it into the matrix products (``addmm(..., alpha=a)``) and into the per-batch constant
drive, so one step costs the matmuls plus a single in-place elementwise pass.

* ``sigmoid``       σ(x) = 1 / (1 + e^{−4(x−½)})      (Ernoult et al. 2019)     g = logistic, a = 4, c = −2
* ``hard_sigmoid``  σ(x) = min(max(x, 0), 1)            (Scellier & Bengio 2017)  g = clamp to [0, 1]
* ``hard_sigmoid_half`` σ(x) = (1 + hardtanh(x − 1)) / 2 = min(max(x/2, 0), 1)  (Laborieux et al. 2021)
* ``tanh``          σ(x) = tanh(x)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch


@dataclass(frozen=True)
class Activation:
    name: str
    scale: float  # a
    shift: float  # c
    base_: Callable[[torch.Tensor], torch.Tensor]  # g, in place
    base: Callable[[torch.Tensor], torch.Tensor]  # g, out of place (autograd-friendly)
    bounds: tuple[float, float]  # the range of σ

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """σ(x) = g(a·x + c), out of place."""
        return self.base(x * self.scale + self.shift)

    def apply_to_affine_(self, z: torch.Tensor) -> torch.Tensor:
        """g(z) in place, where z already holds a·x + c."""
        return self.base_(z)


def _clamp01_(z: torch.Tensor) -> torch.Tensor:
    return z.clamp_(0.0, 1.0)


def _clamp01(z: torch.Tensor) -> torch.Tensor:
    return z.clamp(0.0, 1.0)


ACTIVATIONS: dict[str, Activation] = {
    "sigmoid": Activation("sigmoid", 4.0, -2.0, torch.sigmoid_, torch.sigmoid, (0.0, 1.0)),
    "hard_sigmoid": Activation("hard_sigmoid", 1.0, 0.0, _clamp01_, _clamp01, (0.0, 1.0)),
    "hard_sigmoid_half": Activation("hard_sigmoid_half", 0.5, 0.0, _clamp01_, _clamp01, (0.0, 1.0)),
    "tanh": Activation("tanh", 1.0, 0.0, torch.tanh_, torch.tanh, (-1.0, 1.0)),
}

#: the ``activation:`` values of the EP nets' recipes
ActivationName = Literal["sigmoid", "hard_sigmoid", "hard_sigmoid_half", "tanh"]
