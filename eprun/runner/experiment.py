"""From a recipe and its data to an :class:`Experiment`: network, rule, optimiser, schedule and
seeded generators on one device (and, launched by torchrun, this process's rank)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from eprun import cuda_graphs, distributed, precision
from eprun.assemble import build_network, build_rule, generator, resolve_device
from eprun.data import Splits, load_splits
from eprun.distributed import SINGLE, World
from eprun.errors import RecipeError
from eprun.memory_check import check_memory
from eprun.nets import NETWORKS
from eprun.nets.base import Network
from eprun.optim import build_optimizer, build_scheduler
from eprun.recipe import Recipe
from eprun.rules.base import Rule


@dataclass
class Experiment:
    """Everything a recipe assembles into, on one device."""

    recipe: Recipe
    device: torch.device
    splits: Splits
    net: Network
    rule: Rule
    optimizer: torch.optim.Optimizer
    scheduler: object
    shuffle: torch.Generator
    augment: torch.Generator
    world: World = field(default_factory=World)
    graph_plan: cuda_graphs.GraphPlan = cuda_graphs.GraphPlan("off", False, "train.cuda_graphs: off")
    graphs: cuda_graphs.CapturedTraining | None = None  # the steps as CUDA graphs, where the plan is active
    graph_probe: cuda_graphs.CapturedTraining | None = None  # its divergence flag, read even after a fall-back

    def graphs_fell_back(self, failure: Exception) -> None:
        """A capture failed (``train.cuda_graphs: auto``): every later step runs eagerly, the reason kept."""
        self.graphs = None
        self.graph_plan = cuda_graphs.GraphPlan(self.graph_plan.mode, False, f"capture failed: {failure}")


def load_data(recipe: Recipe, device: torch.device) -> Splits:
    data = recipe.data
    return load_splits(
        data.dataset, root=data.root, val_size=data.val_size, split_seed=recipe.seed,
        normalize=data.normalize, device=device, train_subset=data.train_subset,
    )


def check_fits(recipe: Recipe, info) -> None:
    """Refuse a network that does not fit the dataset (input shape, number of classes)."""
    problems = NETWORKS[recipe.model.kind].check_fits(recipe.model, tuple(info.input_shape), info.num_classes)
    if problems:
        where = recipe.source or recipe.name
        raise RecipeError(f"{where}: model.{problems[0]} (data.dataset {info.name!r} gives input "
                          f"{tuple(info.input_shape)} and {info.num_classes} classes)")


def assemble(recipe: Recipe, splits: Splits, device: torch.device, world: World = SINGLE) -> Experiment:
    precision.apply(recipe.train.precision, device)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    info = splits.info
    check_fits(recipe, info)
    largest = max(len(splits.train), len(splits.test), len(splits.val) if splits.val is not None else 0)
    check_memory(recipe, NETWORKS[recipe.model.kind], tuple(info.input_shape), info.num_classes, largest, device)
    net = build_network(recipe, info.input_shape, info.num_classes, device)
    rule = build_rule(recipe, net)
    if recipe.train.precision == "bf16" and (obstacle := rule.reduced_products_obstacle()) is not None:
        raise RecipeError(f"{recipe.source or recipe.name}: train.precision: bf16 cannot apply: {obstacle} "
                          f"(bf16 applies to rule.kind ep and cep; float32 and tf32 to every rule)")
    graph_plan = cuda_graphs.plan(recipe.train.cuda_graphs, device, rule, world.parallel)
    if recipe.train.cuda_graphs == "on" and not graph_plan.active:
        raise RecipeError(f"{recipe.source or recipe.name}: train.cuda_graphs: on cannot apply: {graph_plan.reason} "
                          f"(auto: capture where it applies, off: never)")
    optimizer = build_optimizer(recipe.optim, net.layer_groups(), capturable=graph_plan.active)
    scheduler = build_scheduler(recipe.schedule, optimizer, recipe.train.epochs)
    if world.parallel:  # every step combines the ranks' updates first
        optimizer = distributed.ReducedOptimizer(optimizer, world)
        rule.distribute(world)
    rule.attach_optimizer(optimizer)  # kept by rules that step it themselves (C-EP, during the nudged phase)
    graphs = cuda_graphs.CapturedTraining(net, rule, optimizer, device) if graph_plan.active else None
    return Experiment(recipe, device, splits, net, rule, optimizer, scheduler,
                      generator(recipe.seed, "shuffle"), generator(recipe.seed, "augment"), world, graph_plan, graphs, graphs)


def join_world(recipe: Recipe) -> tuple[World, torch.device]:
    """This process's rank (a single process outside torchrun) and its device: with several
    ranks on CUDA, the GPU of the rank's local index."""
    device = resolve_device(recipe.device)
    world = distributed.join(device.type)
    if world.parallel and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return world, device
