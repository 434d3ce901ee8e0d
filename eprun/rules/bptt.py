"""Backpropagation through time: the ground truth the GDU theorem is stated against.

The network runs T steps of its own dynamics from s_0 = 0 (``net.step``, the out-of-place,
autograd-friendly step), the loss ℓ(s_T, y) is taken on the last state, and autograd carries
∂ℓ/∂θ back through all T steps::

    s_{t+1} = F(x, s_t, θ),   s_0 = 0,     L = ℓ(s_T, y),     ∇_θ L = Σ_t ∂L/∂s_{t+1} · ∂F/∂θ(x, s_t, θ)

``rule.kind: bptt`` and ``rule.kind: ep`` swap in one recipe: the same network, dynamics,
read-out and loss; prediction from the free phase (the same T steps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eprun import stopping
from eprun.limits import MAX_STEPS, within
from eprun.rules.base import Relaxation, Rule, RuleConfig


@dataclass
class BPTTConfig(RuleConfig):
    """``rule:`` section for ``kind: bptt``."""

    kind: str = "bptt"
    T: int = 30

    def check(self):
        yield from within("T", self.T, 1, MAX_STEPS)

    def relaxation(self) -> Relaxation:
        return Relaxation(self.T)

    def states_held(self) -> int:
        """Autograd keeps every step's states and their pre-activations for the backward pass."""
        return 3 * self.T + 8


class BPTT(Rule):
    Config = BPTTConfig

    def capture_obstacle(self) -> None:
        """T steps forward and autograd's backward: device work only, capturable (after eager steps
        on a side stream, which :mod:`eprun.cuda_graphs` runs first)."""
        return None

    def reduced_products_obstacle(self) -> str:
        """The last K steps are the net's autograd ``step``, not its relaxation: bf16 would cover
        only the steps before them."""
        return "rule.kind bptt: its last K steps run through autograd (the net's step), outside the relaxation"

    def unroll(self, x: torch.Tensor) -> list[torch.Tensor]:
        """s_T after T steps of ``net.step`` from s_0 = 0, with the autograd graph kept.

        Where the net offers an ``input_term`` (the first layer's drive from the static input,
        e.g. W_0 x + b_1), it enters the graph once and every step reuses it: the same function
        of θ, without T copies of the largest product and of its backward.
        """
        net = self.net
        state = net.init_state(x.shape[0], like=x)
        term = net.input_term(x)
        for _ in range(self.cfg.T):
            stopping.check()
            state = net.step(x, state, input_term=term)
        return state

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate ∂(mean ℓ(s_T))/∂θ into ``.grad``; return logits and per-example loss at s_T."""
        with torch.enable_grad():
            state = self.unroll(x)
            loss = self.net.loss(state, y)
            loss.mean().backward()
        with torch.no_grad():
            return self.net.logits(state).detach(), loss.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The free phase, closed form: the same T steps of the same dynamics."""
        state = self.net.init_state(x.shape[0], like=x)
        state = self.net.relax(self.net.input_drive(x), state, self.cfg.T)
        return self.net.logits(state), self.net.loss(state, y)
