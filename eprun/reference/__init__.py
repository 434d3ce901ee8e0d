"""Reference implementations: the papers' formulation of each rule, written independently of
the nets' fast code, against which the product is checked (tests) and timed (``eprun bench``).

* :mod:`eprun.reference.autograd_ep`: EP, BPTT and C-EP by autograd of Φ (``mlp``,
  ``energy_mlp``, ``conv``);
* :mod:`eprun.reference.vector_field`: VF, C-VF and BPTT on the vector-field MLP, which has no Φ.

Both modules provide the functions of :class:`ReferenceRules`; :func:`for_net` picks the one
that formulates a net.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch


class ReferenceRules(Protocol):
    """The rules of one reference formulation (a module that provides these functions)."""

    def supports(self, net) -> bool:
        """Whether this formulation covers ``net``."""

    def ep_train_step(self, net, x: torch.Tensor, y: torch.Tensor, T: int, K: int, beta: float,
                      estimator: str = "one-sided") -> list[torch.Tensor]:
        """One EP (VF) step: −Δθ into ``.grad``; returns s*."""

    def bptt_train_step(self, net, x: torch.Tensor, y: torch.Tensor, T: int) -> list[torch.Tensor]:
        """∂ℓ/∂θ through T steps into ``.grad``; returns s_T."""

    def cep_train_step(self, net, x: torch.Tensor, y: torch.Tensor, T: int, K: int, beta: float, optimizer,
                       estimator: str = "one-sided") -> list[torch.Tensor]:
        """One C-EP (C-VF) step, the optimiser stepped at every nudged step; returns s*."""

    def predict(self, net, x: torch.Tensor, T: int) -> torch.Tensor:
        """Logits after the free phase."""


def for_net(net) -> Optional[ReferenceRules]:
    """The reference formulation of ``net``'s rules, or None where none exists."""
    from eprun.reference import autograd_ep, vector_field

    for module in (autograd_ep, vector_field):
        if module.supports(net):
            return module
    return None
