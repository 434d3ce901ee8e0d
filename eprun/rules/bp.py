"""Backpropagation on the network's feed-forward twin: the baseline EP is measured against.

For the prototypical MLP the twin is s^{n+1} = σ(W_n s^n + b_{n+1}) bottom-up, with the same
parameters, read-out and loss, so ``rule.kind: bp`` and ``rule.kind: ep`` swap in one recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eprun.rules.base import Rule, RuleConfig


@dataclass
class BPConfig(RuleConfig):
    """``rule:`` section for ``kind: bp``."""

    kind: str = "bp"


class BP(Rule):
    Config = BPConfig
    needs_dynamics = False  # any net with a feed-forward pass

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate ∂(mean ℓ)/∂θ into ``.grad`` by autograd; return logits and per-example loss."""
        with torch.enable_grad():
            state = self.net.feedforward(x)
            loss = self.net.loss(state, y)
            loss.mean().backward()
        with torch.no_grad():
            return self.net.logits(state).detach(), loss.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.net.feedforward(x)
        return self.net.logits(state), self.net.loss(state, y)
