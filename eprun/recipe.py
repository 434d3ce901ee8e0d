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
from eprun.limits import MAX_BATCH, MAX_COUNT, MAX_EXAMPLES, MAX_SEED, magnitude, within
from eprun.data.augment import AugmentConfig
from eprun.nets import NETWORKS, network_configs
from eprun.rules import RULES, rule_configs
from eprun.runs.sinks import missing_modules

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
        yield from within("val_size", self.val_size, 0, MAX_EXAMPLES)
        yield from within("batch_size", self.batch_size, 1, MAX_BATCH)
        yield from within("eval_batch_size", self.eval_batch_size, 1, MAX_BATCH)
        if self.train_subset is not None:
            yield from within("train_subset", self.train_subset, 1, MAX_EXAMPLES)


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
            yield from magnitude(name, values)
        if not 0.0 <= self.momentum < 1.0:
            yield "momentum", f"must be in [0, 1), got {self.momentum}"
        for beta in self.betas:
            if not 0.0 <= beta < 1.0:
                yield "betas", f"each must be in [0, 1) (Adam's moment decays), got {list(self.betas)}"
        if not 0.0 < self.eps <= 1.0:
            yield "eps", f"must be > 0 and at most 1, got {self.eps}"
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
        yield from within("step_size", self.step_size, 1, MAX_COUNT)
        if self.min_lr < 0.0:
            yield "min_lr", f"must be ≥ 0, got {self.min_lr}"
        if self.gamma <= 0.0:
            yield "gamma", f"must be > 0, got {self.gamma}"
        yield from magnitude("min_lr", self.min_lr)
        yield from magnitude("gamma", self.gamma)


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
    log_to: list[Literal["tensorboard", "mlflow"]] = field(default_factory=list)  # metric sinks besides metrics.jsonl
    precision: Literal["float32", "tf32", "bf16"] = "float32"  # products and convolutions (eprun/precision.py)
    cuda_graphs: Literal["auto", "on", "off"] = "auto"  # whole steps replayed as CUDA graphs (eprun/cuda_graphs.py)

    def check(self):
        yield from within("epochs", self.epochs, 1, MAX_COUNT)
        yield from within("log_every", self.log_every, 1, MAX_COUNT)
        if self.max_batches is not None:
            yield from within("max_batches", self.max_batches, 1, MAX_COUNT)
        for key, value in (("gdu_every", self.gdu_every), ("diagnostics_every", self.diagnostics_every),
                           ("alignment_every", self.alignment_every), ("checkpoint_every", self.checkpoint_every)):
            yield from within(key, value, 0, MAX_COUNT)  # 0: never (checkpoint_every: at epoch ends only)
        if self.convergence_tol <= 0.0:
            yield "convergence_tol", f"must be > 0, got {self.convergence_tol}"
        yield from magnitude("convergence_tol", self.convergence_tol)
        yield from _check_sinks(self.log_to)


def _check_sinks(log_to: list[str]):
    """Each sink listed once, and its packages installed (looked up, not imported: they are slow
    to import, and only a run that logs to them loads them)."""
    for name in sorted({name for name in log_to if log_to.count(name) > 1}):
        yield "log_to", f"{name} is listed {log_to.count(name)} times; list each sink once (allowed: tensorboard, mlflow)"
    for name in dict.fromkeys(log_to):
        missing = missing_modules(name)
        if missing:
            yield "log_to", (f"{name} needs the module{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                             f"not installed: pip install -e \".[{name}]\"")


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
        yield from within("seed", self.seed, 0, MAX_SEED)
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
