"""The recipe: a YAML file describing one experiment, and its typed schema.

Sections: ``data``, ``model``, ``rule``, ``optim``, ``schedule``, ``train``, and ``seed``.
``model`` and ``rule`` are chosen by their ``kind:`` among the registries of
:mod:`eprun.nets` and :mod:`eprun.rules`, so a new network or rule is validated, listed
and documented without edits here. Every value can be overridden from the command line
with a dotted path: ``-s rule.beta=0.2 -s train.epochs=3``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from eprun import schema
from eprun.data.augment import AugmentConfig
from eprun.nets import NETWORKS, network_configs
from eprun.rules import RULES, rule_configs

PerLayer = Union[float, list[float]]


@dataclass
class DataConfig(schema.Section):
    dataset: str = "mnist"
    root: Optional[str] = None
    val_size: int = 5000
    batch_size: int = 50
    eval_batch_size: int = 1000
    normalize: Literal["none", "standard", "cifar10", "cifar10-laborieux2021", "imagenet32"] = "none"
    train_subset: Optional[int] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self):
        from eprun.data import DATASETS

        if self.dataset not in DATASETS:
            yield "dataset", f"unknown dataset {self.dataset!r} (allowed: {', '.join(sorted(DATASETS))})"
        if self.val_size < 0:
            yield "val_size", f"must be ≥ 0, got {self.val_size}"
        if self.batch_size < 1:
            yield "batch_size", f"must be ≥ 1, got {self.batch_size}"
        if self.eval_batch_size < 1:
            yield "eval_batch_size", f"must be ≥ 1, got {self.eval_batch_size}"
        if self.train_subset is not None and self.train_subset < 1:
            yield "train_subset", f"must be ≥ 1 or null, got {self.train_subset}"


@dataclass
class OptimConfig(schema.Section):
    kind: Literal["sgd", "adam", "adamw"] = "adam"
    lr: PerLayer = 1e-3
    weight_decay: PerLayer = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def check(self):
        for name, values in (("lr", self.lr), ("weight_decay", self.weight_decay)):
            for v in values if isinstance(values, list) else [values]:
                if v < 0:
                    yield name, f"must be ≥ 0, got {v}"
        if self.nesterov and (self.kind != "sgd" or self.momentum <= 0):
            yield "nesterov", "needs kind: sgd and momentum > 0"


@dataclass
class ScheduleConfig(schema.Section):
    """Learning-rate schedule, stepped once per epoch; its length is ``train.epochs``."""

    kind: Literal["constant", "cosine", "step"] = "constant"
    min_lr: float = 0.0
    step_size: int = 1
    gamma: float = 0.1

    def check(self):
        if self.step_size < 1:
            yield "step_size", f"must be ≥ 1 epoch, got {self.step_size}"


@dataclass
class TrainConfig(schema.Section):
    epochs: int = 1
    log_every: int = 50
    max_batches: Optional[int] = None
    checkpoint_every: int = 0  # batches between mid-epoch checkpoints (0: at epoch ends only)
    gdu_every: int = 0  # batches between logs of the angle between the update and the BPTT gradient (0: never)
    diagnostics_every: int = 0  # batches between relaxation diagnostics (0: never)
    alignment_every: int = 0  # batches between logs of target propagation's alignment with BP (0: never)
    convergence_tol: float = 1e-3  # free-phase residual above which a warning is logged

    def check(self):
        if self.epochs < 1:
            yield "epochs", f"must be ≥ 1, got {self.epochs}"
        if self.log_every < 1:
            yield "log_every", f"must be ≥ 1, got {self.log_every}"
        if self.max_batches is not None and self.max_batches < 1:
            yield "max_batches", f"must be ≥ 1 or null, got {self.max_batches}"
        for key, value in (("gdu_every", self.gdu_every), ("diagnostics_every", self.diagnostics_every),
                           ("alignment_every", self.alignment_every)):
            if value < 0:
                yield key, f"must be ≥ 0 (0: never), got {value}"
        if self.checkpoint_every < 0:
            yield "checkpoint_every", f"must be ≥ 0 (0: only at epoch ends), got {self.checkpoint_every}"


@dataclass
class Recipe(schema.Section):
    name: str = ""
    description: str = ""
    paper: str = ""
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = schema.polymorphic(network_configs, "mlp")
    rule: Any = schema.polymorphic(rule_configs, "ep")
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: where the recipe came from (its file), for errors found after validation; not a recipe key
    source: str = field(default="", init=False, compare=False)

    def check(self):
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            yield "device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}"
        if self.seed < 0:
            yield "seed", f"must be ≥ 0, got {self.seed}"
        net_cls, rule_cls = NETWORKS[self.model.kind], RULES[self.rule.kind]
        n_layers = net_cls.layer_count(self.model)
        if not net_cls.has_dynamics and rule_cls.needs_dynamics:
            feedforward_rules = ", ".join(k for k, r in RULES.items() if not r.needs_dynamics)
            yield "rule.kind", (f"{self.rule.kind} needs a network with EP dynamics; model.kind: {self.model.kind} "
                                f"is feed-forward (rules for it: {feedforward_rules})")
        for key, message in self.rule.check_model(self.model, n_layers):
            yield f"rule.{key}" if key != "kind" else "model.kind", message
        for name, values in (("lr", self.optim.lr), ("weight_decay", self.optim.weight_decay)):
            if isinstance(values, list) and len(values) != n_layers:
                yield f"optim.{name}", (
                    f"a list needs one entry per weight layer of the model ({n_layers}), "
                    f"got {len(values)}"
                )


def load_recipe(path: Path | str, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; errors name file, line and key path."""
    data, source = schema.read_yaml(Path(path))
    recipe = recipe_from_data(data, source, overrides, default_name=Path(path).stem)
    recipe.source = str(path)  # named in errors found after validation (e.g. network vs dataset)
    return recipe


def recipe_from_data(data: dict, source: schema.Source, overrides: list[str] = (),
                     default_name: str = "run") -> Recipe:
    for assignment in overrides:
        schema.apply_override(data, assignment, source)
    recipe = schema.build(Recipe, data, source)
    if not recipe.name:
        recipe.name = default_name
    recipe.source = source.name
    return recipe


def to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults and overrides applied) as YAML."""
    return yaml.safe_dump(schema.to_plain(recipe), sort_keys=False)


def from_plain(data: dict, name: str = "recipe") -> Recipe:
    """Rebuild a recipe from the plain data stored in a run or checkpoint."""
    return recipe_from_data(dict(data), schema.Source(name))
