"""NaN or Inf in a training step: found where it appeared, and the run stopped as
:class:`Diverged` with its last good checkpoint named."""

from __future__ import annotations

from pathlib import Path

import torch

from eprun import runs
from eprun.errors import EprunError
from eprun.runner.experiment import Experiment
from eprun.runner.state import Position


class Diverged(EprunError):
    """NaN or Inf appeared; the run stops with status ``diverged``, its last good checkpoint kept."""

    exit_code = 1


def first_non_finite(exp: Experiment, loss: torch.Tensor) -> str | None:
    """Where NaN/Inf appeared in this batch: the loss (i.e. the states), an update, or a weight;
    None if nowhere.

    Every batch: one sum per tensor, stacked, one host read. A sum is NaN/±Inf whenever its
    tensor holds a NaN or an Inf, and costs a read of the tensor, without the boolean tensor
    ``isfinite`` would allocate (a pass over every weight-sized tensor). Only when a sum is
    not finite — a NaN/Inf, or finite values whose sum overflows — are the tensors checked one
    by one."""
    params = list(exp.net.named_parameters())
    sums = [loss.sum()] + [p.grad.sum() for _, p in params if p.grad is not None] + [p.sum() for _, p in params]
    if bool(torch.isfinite(torch.stack(sums)).all()):
        return None
    if not bool(torch.isfinite(loss).all()):
        return "the loss (the network's states)"
    for name, p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"the update of {name}"
    for name, p in params:
        if not bool(torch.isfinite(p).all()):
            return f"the parameter {name}"
    return None  # every value finite: only a sum overflowed


def check_replayed_steps(exp: Experiment, pos: Position, run_dir: Path) -> None:
    """Raise :class:`Diverged` if a step replayed from a CUDA graph since the last check met a NaN or
    an Inf (the graphs' device flag, one host read); the steps are named as a range, the tensor
    as found now."""
    if exp.graph_probe is None:
        return
    first = exp.graph_probe.checked_step + 1
    exp.graph_probe.checked_step = pos.step
    if not exp.graph_probe.take_non_finite():
        return
    params = list(exp.net.named_parameters())
    where = next((f"the parameter {name}" for name, p in params if not bool(torch.isfinite(p).all())),
                 "the loss or an update (the parameters are still finite)")
    message = (f"diverged between step {first} and step {pos.step} (replayed as CUDA graphs, checked at logs and "
               f"checkpoints): NaN/Inf in {where}; the last good checkpoint is {run_dir / runs.LAST_CHECKPOINT}")
    pos.summary.update(status="diverged", error=message)
    raise Diverged(message)
