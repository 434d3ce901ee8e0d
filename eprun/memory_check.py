"""Refusing a recipe whose network and batches cannot fit in memory, before anything is allocated.

The network is built on torch's ``meta`` device (shapes only, no storage) to count its
parameters and the state of one example; the estimate is::

    bytes ≈ 4 · ( 5 · parameters  +  batch · (copies · state + 2 · input) )

(parameters: the weights, their gradients, two optimiser moments and a spare copy; ``copies``:
the state copies the rule holds at once, :meth:`~eprun.rules.base.RuleConfig.states_held`;
batch: the larger of the training and evaluation batches, at most the split). It is compared
with the memory available to this process — the smaller of the kernel's ``MemAvailable`` and
the container's limit (cgroup) on the CPU, the free memory of the device on CUDA. Where the
available memory cannot be read, nothing is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from eprun.errors import RecipeError

#: refuse when the estimate exceeds this share of the available memory
SHARE = 0.9


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes(device: torch.device) -> int | None:
    """The memory this process can still take on ``device``, or None where it cannot be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    limit, usage = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and usage is not None:
        found.append(max(limit - usage, 0))
    return min(found) if found else None


def estimate_bytes(net_cls, model_cfg, rule_cfg, input_shape: tuple[int, ...], num_classes: int,
                   batch: int) -> tuple[int, int] | None:
    """(estimated bytes, parameter count) of training ``net_cls`` at batch ``batch``; None for a
    net that cannot be built on the meta device (one that reads values while it is built)."""
    try:
        with torch.device("meta"):
            net = net_cls(model_cfg, tuple(input_shape), num_classes, torch.Generator().manual_seed(0))
            parameters = sum(p.numel() for p in net.parameters())
            one = torch.empty(1, *input_shape)
            states = net.init_state(1, like=one) if net.has_dynamics else net.feedforward(one)
            state = sum(s.numel() for s in states)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    per_example = rule_cfg.states_held() * state + 2 * math.prod(input_shape)
    return 4 * (5 * parameters + batch * per_example), parameters


def check_memory(recipe, net_cls, input_shape: tuple[int, ...], num_classes: int, largest_split: int,
                 device: torch.device) -> None:
    """Raise a RecipeError naming the sizes when the recipe cannot fit ``device``'s memory."""
    available = available_bytes(device)
    if available is None:
        return
    batch = min(max(recipe.data.batch_size, recipe.data.eval_batch_size), max(largest_split, 1))
    estimate = estimate_bytes(net_cls, recipe.model, recipe.rule, input_shape, num_classes, batch)
    if estimate is None:
        return
    need, parameters = estimate
    if need > SHARE * available:
        where = recipe.source or recipe.name
        raise RecipeError(
            f"{where}: model and data.batch_size / data.eval_batch_size need about {need / 2**30:,.1f} GiB "
            f"({parameters:,} parameters, batches of {batch:,}) but {device} has {available / 2**30:,.1f} GiB "
            f"available; use smaller layers or batches")
