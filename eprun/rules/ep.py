"""Equilibrium Propagation (Scellier & Bengio 2017; Ernoult et al. 2019; Laborieux et al. 2021).

Free phase: T steps of the dynamics from s_0 = 0 give s*. Nudged phase: K steps with
−β ℓ added to Φ, starting from s*, give s^β. The parameter update is::

    Δθ = (1/β) (∂Φ/∂θ(x, s^β, θ) − ∂Φ/∂θ(x, s*, θ))                       one-sided
    Δθ = (1/2β)(∂Φ/∂θ(x, s^β, θ) − ∂Φ/∂θ(x, s^{−β}, θ))                   symmetric (third phase)

and −Δθ is written into ``.grad`` so that any ``torch.optim`` optimiser applies it.
Estimators (Scellier et al. 2023 names in brackets):

* ``one-sided`` [``positive``]: β > 0.
* ``negative``: one-sided with −β.
* ``random-sign``: one-sided with the sign of β drawn per mini-batch (Laborieux et al. 2021);
  the draw uses the rule's own seeded generator.
* ``symmetric`` [``centered``]: the ±β estimate with a third phase.

A softmax read-out (outside Φ) is trained on the exact gradient of its loss at s*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from eprun.limits import MAX_STEPS, magnitude, within
from eprun.rules.base import Relaxation, Rule, RuleConfig

Estimator = Literal["one-sided", "positive", "negative", "random-sign", "symmetric", "centered"]


@dataclass
class EPConfig(RuleConfig):
    """``rule:`` section for ``kind: ep``."""

    kind: str = "ep"
    T: int = 30
    K: int = 10
    beta: float = 0.1
    estimator: Estimator = "one-sided"
    sign_probability: float = 0.5
    pair_with: Optional[Literal["bptt"]] = None  # also train BPTT from the same initial weights
    order: Literal["sync", "async"] = "sync"  # layer update schedule of every phase
    tol: float = 0.0  # > 0: end a phase early once no state changes by tol or more in a step
    check_every: int = 5  # steps between two convergence checks (host synchronisations) when tol > 0
    # with tol > 0, whose change ends the phase: the whole batch's (the phase ends for all at once),
    # or each example's own (an example stops at its own check; the compiled MLP kernel runs this one)
    tol_scope: Literal["batch", "example"] = "batch"

    def check(self):
        yield from within("T", self.T, 1, MAX_STEPS)  # the free phase's steps
        yield from within("K", self.K, 1, MAX_STEPS)  # the nudged phase's
        if self.beta == 0.0:
            yield "beta", "must be non-zero: EP divides by β"
        yield from magnitude("beta", self.beta)
        yield from magnitude("tol", self.tol)
        if not 0.0 <= self.sign_probability <= 1.0:
            yield "sign_probability", f"a probability in [0, 1], got {self.sign_probability}"
        if self.tol < 0.0:
            yield "tol", f"must be ≥ 0 (0: always T and K steps), got {self.tol}"
        yield from within("check_every", self.check_every, 1, MAX_STEPS)

    def check_model(self, model, n_layers: int):
        """The asynchronous schedule and early stopping exist for nets whose ``relax`` takes them
        (``relax_schedules``: the prototypical MLP and conv nets); a vector-field net's per-step
        update takes one nudged phase."""
        from eprun.nets import NETWORKS
        from eprun.nets.base import EPNetwork
        from eprun.nets.vf_mlp import VFMLPConfig

        def takes_schedules(net) -> bool:
            return issubclass(net, EPNetwork) and net.relax_schedules

        per_step = isinstance(model, VFMLPConfig) and model.nudged_update == "per_step"
        if per_step and self.estimator in ("symmetric", "centered"):
            yield "estimator", ("model.nudged_update: per_step sums one nudged phase's steps; the symmetric "
                                "estimator's two phases are not written for it (one-sided, negative, random-sign)")
        custom = self.order != "sync" or self.tol > 0.0
        if custom and not takes_schedules(NETWORKS[model.kind]):
            kinds = ", ".join(kind for kind, net in NETWORKS.items() if takes_schedules(net))
            yield "order" if self.order != "sync" else "tol", (
                f"order: async and tol > 0 are available for model.kind: {kinds}, not {model.kind}")

    def relaxation(self) -> Relaxation:
        return Relaxation(self.T, self.K, self.beta, self.estimator)

    def label(self) -> str:
        return f"{self.kind}/{self.estimator}"

    def paired_rule(self):
        """``pair_with: bptt``: BPTT through the same T steps."""
        if self.pair_with != "bptt":
            return None
        from eprun.rules.bptt import BPTTConfig

        return BPTTConfig(T=self.T)

    def schedule(self) -> dict:
        """Keyword arguments of ``net.relax`` for a non-default schedule (none for the papers')."""
        if self.order == "sync" and self.tol == 0.0:
            return {}
        return {"order": self.order, "tol": self.tol, "check_every": self.check_every, "tol_scope": self.tol_scope}


class EP(Rule):
    """EP on any :class:`~eprun.nets.base.EPNetwork`."""

    Config = EPConfig

    def __init__(self, cfg: EPConfig, net, generator: torch.Generator):
        super().__init__(cfg, net, generator)  # the generator draws β's sign
        self._prepared_beta: Optional[float] = None  # prepare_batch's β, used by train_step until the next
        self._steps = {"free": [0, 0], "nudged": [0, 0]}  # with tol > 0: [steps taken, phases] per kind

    def _count(self, phase: str) -> None:
        if self.cfg.tol > 0.0:
            tally = self._steps[phase]
            tally[0] += self.net.last_relax_steps
            tally[1] += 1

    def _count_steps(self, steps: tuple[float, float]) -> None:
        """:meth:`_count` for both phases of one call, from their mean steps."""
        if self.cfg.tol > 0.0:
            for phase, taken in zip(("free", "nudged"), steps):
                self._steps[phase][0] += taken
                self._steps[phase][1] += 1

    def log_stats(self) -> dict:
        """For the training log, with ``tol`` > 0: the mean number of steps the free and nudged
        phases took since the last call (training batches only), then reset."""
        out = {f"relax_steps_{phase}": taken / phases for phase, (taken, phases) in self._steps.items() if phases}
        self._steps = {"free": [0, 0], "nudged": [0, 0]}
        return out

    def _beta(self) -> float:
        """β for this mini-batch: its sign is drawn for ``random-sign``, negated for ``negative``."""
        beta = self.cfg.beta
        if self.cfg.estimator == "negative":
            return -abs(beta)
        if self.cfg.estimator == "random-sign":
            draw = torch.rand((), generator=self.generator)
            return -abs(beta) if float(draw) < self.cfg.sign_probability else abs(beta)
        return beta

    def prepare_batch(self) -> float:
        """Draw the next batch's β (its sign for ``random-sign``) and return it: the key of the
        batch's CUDA graph (one graph per sign)."""
        self._prepared_beta = self._beta()
        return self._prepared_beta

    def _batch_beta(self) -> float:
        """β of this training batch: :meth:`prepare_batch`'s, or drawn now where none was prepared."""
        return self._prepared_beta if self._prepared_beta is not None else self._beta()

    def capture_obstacle(self) -> Optional[str]:
        """With ``tol`` > 0 a phase ends when a convergence check, read on the host, says so."""
        if self.cfg.tol > 0.0:
            return "rule.tol > 0: a phase ends on a convergence check read on the host"
        return None

    def reduced_products_obstacle(self) -> None:
        """Both (all three) phases are ``net.relax``; the update is float32 state products."""
        return None

    def schedule(self) -> dict:
        """Keyword arguments of ``net.relax`` for the recipe's schedule."""
        return self.cfg.schedule()

    @torch.no_grad()
    def free_phase(self, drive: torch.Tensor) -> list[torch.Tensor]:
        """s* after T steps from s_0 = 0 (fewer if ``tol`` ends the phase early)."""
        state = self.net.init_state(drive.shape[0], like=drive)
        return self.net.relax(drive, state, self.cfg.T, **self.schedule())

    @torch.no_grad()
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write −Δθ into ``.grad`` (assumed zeroed); return the free-phase logits and per-example loss."""
        net, cfg = self.net, self.cfg
        drive = net.input_drive(x)  # W_0 x + b_1, once for all phases
        beta = self._batch_beta()
        symmetric = cfg.estimator in ("symmetric", "centered")
        per_step = net.accumulates_nudged_steps
        fused = None if symmetric or per_step else net.ep_phases(drive, y, cfg.T, cfg.K, beta, **self.schedule())
        if fused is not None:  # both phases in one compiled call: the same steps as the two relaxations below
            free, nudged, loss, steps = fused
            self._count_steps(steps)
            net.accumulate_dphi_dtheta_difference_(x, free, nudged, 1.0 / beta)
            net.accumulate_readout_grad_(free, y)  # nothing to add for the MSE read-out this path takes
            return net.logits(free), loss
        target = net.target(y, x)
        free = self.free_phase(drive)
        self._count("free")
        logits, loss = net.logits(free), net.loss(free, y)
        if per_step:  # −Δθ = (1/β) Σ_k V(s_k, s_{k+1}), written step by step
            self._nudged_steps_accumulated(x, drive, free, beta, target)
            net.accumulate_readout_grad_(free, y)
            return logits, loss
        nudged = net.relax(drive, [s.clone() for s in free], cfg.K, beta, target, **self.schedule())
        self._count("nudged")
        if symmetric:
            anti = net.relax(drive, [s.clone() for s in free], cfg.K, -beta, target, **self.schedule())
            self._count("nudged")
            # −Δθ = (1/2β)(∂Φ/∂θ(s^{−β}) − ∂Φ/∂θ(s^β))
            net.accumulate_dphi_dtheta_difference_(x, anti, nudged, 1.0 / (2 * beta))
        else:
            # −Δθ = (1/β)(∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β))
            net.accumulate_dphi_dtheta_difference_(x, free, nudged, 1.0 / beta)
        net.accumulate_readout_grad_(free, y)
        return logits, loss

    def _nudged_steps_accumulated(self, x, drive, free, beta, target) -> None:
        """The K nudged steps one at a time from s_0 = s*, each step's increment written as it is
        taken: .grad += (1/β) V(s_k, s_{k+1}) (the net's ``accumulates_nudged_steps``)."""
        net = self.net
        cur, nxt = [s.clone() for s in free], [s.clone() for s in free]
        for _ in range(self.cfg.K):
            for new, old in zip(nxt, cur):
                new.copy_(old)
            net.relax(drive, nxt, 1, beta, target, **self.schedule())  # s_{k+1} = F(x, s_k, θ, β)
            net.accumulate_dphi_dtheta_difference_(x, cur, nxt, 1.0 / beta)
            cur, nxt = nxt, cur
        self._count("nudged")

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction from the free fixed point: logits and per-example loss."""
        free = self.free_phase(self.net.input_drive(x))
        return self.net.logits(free), self.net.loss(free, y)
