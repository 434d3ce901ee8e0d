"""The contract of a learning rule and of its recipe section.

* :class:`RuleConfig` — the ``rule:`` section of a recipe (a dataclass that also subclasses
  this): validation, and what the runner, the GDU check and the benchmark read from it
  (:meth:`RuleConfig.relaxation`, :meth:`RuleConfig.label`, :meth:`RuleConfig.paired_rule`).
* :class:`Rule` — turns a batch into parameter updates written into ``.grad`` (so that any
  ``torch.optim`` optimiser applies them) and scores a batch.

Optional capabilities are class attributes with a default (``needs_dynamics``,
``steps_optimizer``, ``measures_alignment``) or methods with a default that does nothing or
says "not offered" (:meth:`Rule.attach_optimizer`, :meth:`Rule.log_stats`,
:meth:`Rule.alignment`, :meth:`Rule.prepare_batch`, :meth:`Rule.capture_obstacle`). Callers use
them; they never probe a rule with ``hasattr``. A new rule subclasses :class:`Rule` and is
registered in :data:`eprun.rules.RULES` (docs/extending.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Hashable, Iterator, Optional

import torch

from eprun.schema import Section


@dataclass(frozen=True)
class Relaxation:
    """The relaxation a rule runs: T free steps; K nudged steps with β (None where the rule has
    no nudged phase, e.g. BPTT); the estimator's name where it has one."""

    T: int
    K: Optional[int] = None
    beta: Optional[float] = None
    estimator: Optional[str] = None


class RuleConfig(Section):
    """Behaviour shared by every ``rule:`` section; each rule's config is a dataclass that
    subclasses this and declares its keys, ``kind`` first."""

    kind: str

    def check_model(self, model, n_layers: int) -> Iterator[tuple[str, str]]:
        """(key, message) for each value that does not fit the recipe's ``model:`` section
        (``n_layers``: its number of weight layers); key ``"kind"`` names ``model.kind``."""
        return iter(())

    def relaxation(self) -> Optional[Relaxation]:
        """T, K, β of a rule that relaxes the net's dynamics (for the GDU check, the diagnostics
        and the benchmark); None for rules without a relaxation."""
        return None

    def label(self) -> str:
        """The rule as runs and tables name it, e.g. ``ep/random-sign``."""
        return self.kind

    def paired_rule(self) -> Optional["RuleConfig"]:
        """A second rule to train from the same initial weights after this one (``pair_with``), or None."""
        return None

    def states_held(self) -> int:
        """How many copies of the network's state a training step holds at once, per example (for
        the memory estimate of :mod:`eprun.memory_check`)."""
        return 8


class Rule(ABC):
    """A learning rule, keyed by its recipe's ``rule.kind``; built as ``cls(cfg, net, generator)``
    with its own seeded generator for every random draw it makes."""

    Config: ClassVar[type]
    #: True: the net must have EP dynamics (an :class:`~eprun.nets.base.EPNetwork`); False: any net.
    needs_dynamics: ClassVar[bool] = True
    #: True: ``train_step`` applies the updates itself (through :meth:`attach_optimizer`'s
    #: optimiser) and the runner must not step the optimiser again.
    steps_optimizer: ClassVar[bool] = False
    #: True: :meth:`alignment` measures the update against BP's gradient (``train.alignment_every``).
    measures_alignment: ClassVar[bool] = False

    def __init__(self, cfg: RuleConfig, net, generator: torch.Generator):
        self.cfg = cfg
        self.net = net
        self.generator = generator

    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write −Δθ into ``.grad`` (zeroed by the caller); return this batch's logits and per-example loss."""

    @abstractmethod
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction on a batch: logits and per-example loss."""

    def prepare_batch(self) -> Hashable:
        """Make the next training batch's host-side random draws from the rule's generator and
        return a key of what they select (EP's ``random-sign``: β with its sign); None where the
        rule draws nothing. The next :meth:`train_step` uses them, and so does every later one
        until the next call (a step replayed from a CUDA graph does not call ``train_step``); a
        ``train_step`` with nothing prepared draws for itself. The runner calls this before every
        training batch, so that a batch replayed from a graph draws exactly as an eager one, and
        keys its graphs on the result (:mod:`eprun.cuda_graphs`)."""
        return None

    def capture_obstacle(self) -> Optional[str]:
        """Why this rule's :meth:`train_step` and :meth:`evaluate` cannot be recorded as a CUDA
        graph, or None where they can: they launch device work only (no host read of a device
        value), and change no host-side state per batch beyond :meth:`prepare_batch`'s draws."""
        return f"rule.kind {self.cfg.kind}: its step is not written for CUDA-graph capture"

    def reduced_products_obstacle(self) -> Optional[str]:
        """Why ``train.precision: bf16`` (the relaxation's products on bfloat16 operands,
        :mod:`eprun.precision`) cannot apply to this rule, or None where it can: every product
        of its steps goes through the net's ``relax`` and its update stays float32."""
        return f"rule.kind {self.cfg.kind}: its steps do not all go through the net's relaxation"

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once with the recipe's optimiser; only rules with ``steps_optimizer`` keep it."""

    def distribute(self, world) -> None:
        """Called once when training is data-parallel (:mod:`eprun.distributed`), with this rank's
        :class:`~eprun.distributed.World`. A rule that steps optimisers of its own wraps them in
        :class:`~eprun.distributed.ReducedOptimizer`; one that draws per-example noise draws it for
        the whole batch and keeps its rows ``world.rows``, so that the ranks together make the
        draws of one process."""

    def log_stats(self) -> dict[str, float]:
        """Figures of the steps since the last call, logged with the training record; then reset."""
        return {}

    def alignment(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, float]:
        """With ``measures_alignment``: on this batch, the update in ``.grad`` against BP's gradient."""
        return {}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
