"""The training position and everything a checkpoint holds to resume it bit for bit.

Every checkpoint holds the exact position in training (epoch, batch, the shuffling generator's
state at the start of the epoch, the running metric sums, every RNG), so a resumed run
continues — killed at any moment — to the same weights and metrics, bit for bit on CPU, as if it
had never stopped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from eprun import schema
from eprun.errors import CheckpointError
from eprun.recipe import Recipe
from eprun.runner.experiment import Experiment


class Window:
    """Running sums of loss and correct predictions, kept on the device (no sync per batch)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.n = 0

    def add(self, logits, loss, y):
        self.loss += loss.sum().double()
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.n += len(y)

    def add_device_sums(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        """A batch's sums as device scalars (a CUDA graph's outputs): no host synchronisation."""
        self.loss += loss_sum
        self.correct += correct
        self.n += n

    def add_sums(self, loss_sum: float, correct: int, n: int) -> None:
        """A batch's sums as already combined over the ranks."""
        self.loss += loss_sum
        self.correct += correct
        self.n += n

    def flush(self) -> dict:
        out = {"loss": float(self.loss) / max(self.n, 1), "accuracy": int(self.correct) / max(self.n, 1),
               "samples": self.n}
        self.reset()
        return out

    def state_dict(self) -> dict:
        return {"loss": self.loss.cpu(), "correct": self.correct.cpu(), "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.loss = state["loss"].to(self.device)
        self.correct = state["correct"].to(self.device)
        self.n = state["n"]


@dataclass
class Position:
    """Where training is: the next batch to run, and what has been accumulated so far."""

    epoch: int = 0  # 0-based epoch in progress
    batch: int = 0  # next batch index within the epoch
    step: int = 0  # optimiser steps taken
    epoch_shuffle_state: torch.Tensor | None = None  # shuffling generator at the start of `epoch`
    train_time_s: float = 0.0
    samples: int = 0
    metrics_records: int = 0
    summary: dict = field(default_factory=dict)
    val_pending: bool = False  # `epoch`'s training is done, its validation not yet


def checkpoint_state(exp: Experiment, pos: Position, window: Window, epoch_window: Window) -> dict:
    """A checkpoint: tensors and plain data only (loadable with ``weights_only=True``)."""
    rng = {"torch": torch.get_rng_state(), "python": _python_rng_state(), "shuffle": exp.shuffle.get_state(),
           "augment": exp.augment.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "recipe": schema.to_plain(exp.recipe),
        "model": exp.net.state_dict(),
        "optimizer": exp.optimizer.state_dict(),
        "scheduler": exp.scheduler.state_dict() if exp.scheduler is not None else None,
        "rule": exp.rule.state_dict(),
        "rng": rng,
        "epoch": pos.epoch, "batch": pos.batch, "step": pos.step,
        "epoch_shuffle_state": pos.epoch_shuffle_state,
        "train_time_s": pos.train_time_s, "samples": pos.samples,
        "metrics_records": pos.metrics_records, "world_size": exp.world.size, "val_pending": pos.val_pending,
        "window": window.state_dict(), "epoch_window": epoch_window.state_dict(),
        "summary": dict(pos.summary),
    }


def restore(exp: Experiment, state: dict, window: Window, epoch_window: Window, where: str) -> Position:
    """Load a checkpoint into a freshly assembled experiment; return the training position."""
    try:
        exp.net.load_state_dict(state["model"])
        exp.optimizer.load_state_dict(state["optimizer"])
        if exp.scheduler is not None and state.get("scheduler") is not None:
            exp.scheduler.load_state_dict(state["scheduler"])
        exp.rule.load_state_dict(state["rule"])
        exp.shuffle.set_state(state["rng"]["shuffle"])
        exp.augment.set_state(state["rng"]["augment"])
        torch.set_rng_state(state["rng"]["torch"])
        _set_python_rng_state(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        window.load_state_dict(state["window"])
        epoch_window.load_state_dict(state["epoch_window"])
        return Position(epoch=state["epoch"], batch=state["batch"], step=state["step"],
                        epoch_shuffle_state=state["epoch_shuffle_state"],
                        train_time_s=state["train_time_s"], samples=state["samples"],
                        metrics_records=state["metrics_records"], summary=dict(state["summary"]),
                        val_pending=bool(state.get("val_pending", False)))
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: does not fit this run's network or format ({first})") from None


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


def batches_per_epoch(recipe: Recipe, n_train: int) -> int:
    n = math.ceil(n_train / recipe.data.batch_size)
    return min(n, recipe.train.max_batches) if recipe.train.max_batches else n
