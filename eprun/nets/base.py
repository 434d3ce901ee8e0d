"""The contract of a network: everything the runner, the rules, the GDU check, the
diagnostics and the benchmark call on a net.

Two levels, as two abstract base classes:

* :class:`Network` — every net: its recipe section, its parameters grouped by weight layer,
  a feed-forward pass (the BP baseline), the prediction and the loss.
* :class:`EPNetwork` — a net with EP dynamics: a state s = (s¹ … s^N) relaxed from the static
  input x, the closed-form update that EP-type rules write into ``.grad``, and, where the
  dynamics derive from a primitive function Φ, Φ itself as the autograd oracle.

Optional capabilities are class attributes with a default (``has_phi``, ``relax_schedules``,
``nudge_scale``, ``nudges_after_activation``, ``softmax_readout``, ``linear_input_drive``, ``accumulates_nudged_steps``) or methods with a default that says "not offered"
(:meth:`EPNetwork.ep_phases` returns None, :meth:`EPNetwork.input_term` returns None,
:meth:`EPNetwork.continual_nudged_phase_` returns False,
:meth:`Network.monitor` returns ``{}``). Callers read these; they never probe a net with
``hasattr``. A new net subclasses one of the two and is registered in
:data:`eprun.nets.NETWORKS` (docs/extending.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from eprun.limits import MAX_UNITS, magnitude, within
from eprun.schema import Section


@dataclass(frozen=True)
class WeightProducts:
    """What one application of each weight layer to a batch costs, for the benchmark's
    multiply-add count: ``products[j]`` = P_j (multiply-adds of weight layer j on the batch),
    ``is_conv[j]`` whether it is a convolution, ``laterals`` the products of lateral weights
    (energy-based nets) per step."""

    products: tuple[int, ...]
    is_conv: tuple[bool, ...]
    laterals: tuple[int, ...] = ()


class Network(nn.Module, ABC):
    """Every network, keyed by its recipe's ``model.kind``.

    Subclasses set :attr:`Config` (the dataclass of their ``model:`` section) and implement
    the abstract methods. Construction: ``cls(cfg, input_shape, num_classes, generator)``,
    every random draw from ``generator``.
    """

    Config: ClassVar[type]
    #: False for feed-forward nets (target propagation): only rules with ``needs_dynamics = False``.
    has_dynamics: ClassVar[bool] = False
    #: a softmax read-out outside the dynamics (prediction softmax(W_out s^N + b_out)).
    softmax_readout: bool = False
    num_classes: int

    @staticmethod
    @abstractmethod
    def layer_count(cfg) -> int:
        """The number of weight layers: the length of per-layer lists (learning rates, scales)."""

    @staticmethod
    def check_fits(cfg, input_shape: tuple[int, ...], num_classes: int) -> list[str]:
        """What does not fit the dataset, one ``"key: message"`` line each (key within ``model:``)."""
        return []

    @abstractmethod
    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The trained parameters grouped by weight layer, in order (one optimiser group each)."""

    @abstractmethod
    def feedforward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The layers' values of the feed-forward pass, bottom-up, autograd-friendly."""

    @abstractmethod
    def logits(self, state: list[torch.Tensor]) -> torch.Tensor:
        """The prediction scores from the last layer of ``state``."""

    @abstractmethod
    def loss(self, state: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """The per-example loss ℓ of the prediction from ``state``."""

    @abstractmethod
    def describe(self) -> str:
        """A short name of the architecture for tables, e.g. ``784-512-10``."""

    def monitor(self) -> dict[str, float]:
        """Quantities of the weights logged with each training record (e.g. a vector-field
        net's angles between forward and backward weights); none by default."""
        return {}

    def weight_products(self, batch: int) -> Optional[WeightProducts]:
        """Multiply-adds of applying each weight layer once to ``batch`` examples, for the
        benchmark's arithmetic count; None where no count is written."""
        return None


class EPNetwork(Network):
    """A network with EP dynamics.

    State s = (s¹ … s^N), one tensor per layer with the batch first; static input x = s⁰. A
    relaxation runs the (nudged if β ≠ 0) dynamics in place and without autograd; ``step`` is
    the same step out of place and autograd-friendly (BPTT, GDU and the tests differentiate it).
    The update that EP-type rules write into ``.grad`` is
    ``accumulate_dphi_dtheta_difference_(x, s_a, s_b, scale)``: scale·(∂Φ/∂θ(s_a) − ∂Φ/∂θ(s_b)),
    or its vector-field analogue where there is no Φ.
    """

    has_dynamics: ClassVar[bool] = True
    #: the dynamics derive from a primitive function Φ (``phi``, ``dphi_dtheta``, ``phi_parameters``
    #: exist; the GDU check and the autograd-of-Φ baseline apply). False: a vector field.
    has_phi: ClassVar[bool] = True
    #: ``relax`` takes ``order``, ``tol``, ``check_every`` and ``tol_scope`` (else only the papers'
    #: schedule: every layer from s_t, a fixed number of steps).
    relax_schedules: ClassVar[bool] = False
    #: c in the nudge c·β·∂(−ℓ)/∂s^N of one step (the energy-based net's ε; 1 elsewhere).
    nudge_scale: float = 1.0
    #: the nudged phase adds β(y − s^N_t) to the output layer after σ (the conv nets' ``model.nudge:
    #: post_activation``) rather than β·∂(−ℓ)/∂s^N to its pre-activation: the dynamics are then not
    #: σ(∂(Φ − βℓ)/∂s) at the output, and a reference of Φ − βℓ must follow the net's form.
    nudges_after_activation: bool = False
    #: the input drive is a·(x̃ W_0ᵀ + b_1) + c with (x̃, W_0, b_1, a) = :meth:`input_layer` (x),
    #: and the update written for W_0 and b_1 is scale·(s¹_a − s¹_b)ᵀx̃ and scale·Σ_b(s¹_a − s¹_b),
    #: batch mean, with ``accumulate_dphi_dtheta_difference_(…, skip_input_layer=True)`` leaving
    #: them alone: a rule that moves W_0 and b_1 during a phase (C-EP) can then follow the drive
    #: through x̃x̃ᵀ instead of recomputing it (``rules/cep.py``).
    linear_input_drive: ClassVar[bool] = False
    #: EP writes the sum of the nudged steps' increments, Σ_k V(s_k, s_{k+1}) through
    #: ``accumulate_dphi_dtheta_difference_``, instead of V(s*, s^β) (a vector-field net's
    #: ``nudged_update: per_step``; for a net with Φ the two are equal: the sum telescopes).
    accumulates_nudged_steps: bool = False
    #: set by every relaxation: the steps it took (their mean over the examples where each stops
    #: on its own), and the engine that ran it ("torch", "native", "torch+native" or "triton").
    last_relax_steps: float = 0.0
    last_relax_engine: str = "torch"

    # ------------------------------------------------------------------ state and dynamics

    @abstractmethod
    def init_state(self, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        """s_0, in ``like``'s dtype and device."""

    @abstractmethod
    def input_drive(self, x: torch.Tensor) -> torch.Tensor:
        """The part of a step that depends on the static input only, computed once per batch
        and passed to :meth:`relax`."""

    @abstractmethod
    def relax(self, drive: torch.Tensor, state: list[torch.Tensor], steps: int, beta: float = 0.0,
              target: Optional[torch.Tensor] = None, **schedule) -> list[torch.Tensor]:
        """``steps`` steps of the dynamics in place on ``state`` (nudged towards ``target`` when
        β ≠ 0), no autograd; returns ``state``. ``schedule``: see :attr:`relax_schedules`."""

    @abstractmethod
    def step(self, x: torch.Tensor, state: list[torch.Tensor], beta: float = 0.0,
             target: Optional[torch.Tensor] = None, input_term=None) -> list[torch.Tensor]:
        """One step out of place, autograd-friendly: the readable definition of :meth:`relax`.
        ``input_term``: :meth:`input_term` of x, if the net offers one."""

    def input_term(self, x: torch.Tensor):
        """The static input's part of a step as :meth:`step` takes it (autograd-friendly), so
        that BPTT builds it into its graph once instead of at every step; None where the net's
        step has no such part to share."""
        return None

    @abstractmethod
    def target(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The labels as the nudge takes them (one-hot), in ``like``'s dtype and device."""

    def input_layer(self, x: torch.Tensor) -> tuple[torch.Tensor, nn.Parameter, nn.Parameter, float]:
        """(x̃, W_0, b_1, a) of the drive a·(x̃ W_0ᵀ + b_1) + c, where :attr:`linear_input_drive`."""
        raise NotImplementedError(f"{type(self).__name__}'s input drive is not a·(x W_0ᵀ + b_1) + c")

    def ep_phases(self, drive: torch.Tensor, labels: torch.Tensor, free_steps: int, nudged_steps: int, beta: float,
                  **schedule):
        """EP's free phase and one-sided nudged phase in one call of a faster engine:
        (s*, s^β, per-example loss at s*, (mean steps free, mean steps nudged)), the same steps
        as two calls of :meth:`relax`; None where no such engine applies (the default)."""
        return None

    def continual_nudged_phase_(self, x: torch.Tensor, drive: torch.Tensor, free: list[torch.Tensor], steps: int,
                                beta: float, target: torch.Tensor, y: torch.Tensor, rate) -> bool:
        """C-EP's nudged phase with plain SGD at ``rate(p)`` per parameter, run by a faster engine
        that leaves every parameter as the step-by-step rule does (``rules/cep.py``): True if it
        ran, False where the net offers none (the default)."""
        return False

    # ------------------------------------------------------------------ updates

    @abstractmethod
    def accumulate_dphi_dtheta_difference_(self, x: torch.Tensor, state_a: list[torch.Tensor],
                                           state_b: list[torch.Tensor], scale: float) -> None:
        """θ.grad += scale·(∂Φ/∂θ(x, s_a, θ) − ∂Φ/∂θ(x, s_b, θ)), batch mean (a vector-field net:
        its VF update with the pre-synaptic units at s_a). Nets with :attr:`linear_input_drive`
        also take ``skip_input_layer=True``: every parameter but W_0 and b_1."""

    def accumulate_readout_grad_(self, state: list[torch.Tensor], y: torch.Tensor) -> None:
        """The read-out outside Φ (if any): its exact loss gradient at ``state`` into ``.grad``."""

    # ------------------------------------------------------------------ Φ (where has_phi)

    def phi(self, x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """Φ(x, s, θ) per example, autograd-friendly: the oracle of the closed forms."""
        raise NotImplementedError(self._no_phi())

    def dphi_dtheta(self, x: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """∂Φ/∂θ at ``state``, batch mean, in :meth:`phi_parameters` order (closed form)."""
        raise NotImplementedError(self._no_phi())

    def phi_parameters(self) -> list[nn.Parameter]:
        """θ of Φ, in the order :meth:`dphi_dtheta` returns."""
        raise NotImplementedError(self._no_phi())

    def _no_phi(self) -> str:
        return (f"{type(self).__name__} has no primitive function Φ: its dynamics are a vector field "
                f"(backward weights differ from the forward ones)")

    # ------------------------------------------------------------------ for diagnostics

    def state_bounds(self) -> Optional[tuple[float, float]]:
        """The range the activation keeps states in (for the saturation diagnostic), or None."""
        return None


class ModelConfig(Section):
    """Behaviour shared by every ``model:`` section; each net's config is a dataclass that
    subclasses this and declares its keys, ``kind`` first."""

    kind: str


def dense_chain_problems(hidden: list[int], weight_scale, example: str):
    """(key, problem) pairs for the keys every chain of fully connected layers has: ``hidden``
    (at least one size, each in [1, MAX_UNITS]) and ``weight_scale`` (one number, or one per
    weight layer: len(hidden) + 1). ``example`` is the hidden sizes an error message suggests."""
    yield from magnitude("weight_scale", weight_scale)
    if not hidden:
        yield "hidden", f"needs at least one hidden layer size, e.g. {example}"
    for size in hidden:
        yield from within("hidden", size, 1, MAX_UNITS)
    n_layers = len(hidden) + 1
    if isinstance(weight_scale, list) and len(weight_scale) != n_layers:
        yield "weight_scale", (f"a list needs one entry per weight layer ({n_layers} for hidden={hidden}), "
                               f"got {len(weight_scale)}")
