"""Optimisers with per-layer learning rates and weight decays, and epoch-length schedules."""

from __future__ import annotations

import torch

from eprun import lean_optimizers
from eprun.recipe import OptimConfig, ScheduleConfig


def _per_layer(value, n: int) -> list[float]:
    return list(value) if isinstance(value, list) else [float(value)] * n


def build_optimizer(cfg: OptimConfig, layer_groups: list[list[torch.nn.Parameter]],
                    capturable: bool = False) -> torch.optim.Optimizer:
    """One parameter group per weight layer, with its own ``lr`` and ``weight_decay``.

    ``capturable``: the step may be recorded in a CUDA graph (:mod:`eprun.cuda_graphs`): Adam and
    AdamW keep their step count on the device (torch's ``capturable``); SGD has no step count."""
    lrs = _per_layer(cfg.lr, len(layer_groups))
    decays = _per_layer(cfg.weight_decay, len(layer_groups))
    groups = [{"params": params, "lr": lr, "weight_decay": wd}
              for params, lr, wd in zip(layer_groups, lrs, decays)]
    # torch's fused kernels (docs/performance.md: faster than its per-tensor loop), through the short
    # path of eprun.lean_optimizers where its check passes
    fused = _fused_ok(layer_groups)
    if cfg.kind == "sgd":
        return lean_optimizers.build("sgd", groups, lr=lrs[0], momentum=cfg.momentum, nesterov=cfg.nesterov,
                                     fused=fused)
    if cfg.kind in ("adam", "adamw"):
        extra = {"capturable": True} if capturable else {}
        return lean_optimizers.build(cfg.kind, groups, lr=lrs[0], betas=tuple(cfg.betas), eps=cfg.eps, fused=fused,
                                     **extra)
    raise ValueError(f"unknown optimiser {cfg.kind!r}")


def _fused_ok(layer_groups) -> bool | None:
    params = [p for group in layer_groups for p in group]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if ok else None


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, epochs: int):
    """A scheduler stepped once per epoch; a cosine schedule spans exactly ``epochs`` epochs."""
    if cfg.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
    if cfg.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return None
