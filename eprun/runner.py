"""Training and evaluation loops: the only place that loops over epochs and writes run files.

``train`` reads top to bottom: load data, assemble the experiment, create the run directory,
then :func:`run_loop`: for each epoch shuffle, step the rule and the optimiser on every batch,
score the validation split, checkpoint; finally score the test split with the final model.

Every checkpoint holds the exact position in training (epoch, batch, the shuffling
generator's state at the start of the epoch, the running metric sums, every RNG), so
``resume`` continues a run — killed at any moment — to the same weights and metrics, bit for
bit on CPU, as if it had never stopped.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from eprun import catalog, cuda_graphs, distributed, plots, precision, runs, schema, stopping
from eprun.assemble import build_network, build_rule, generator, resolve_device
from eprun.data import Split, Splits, load_splits, synthetic_like
from eprun.data.augment import augment
from eprun.distributed import SINGLE, World
from eprun.errors import CheckpointError, EprunError, RecipeError, RunDirError, StorageError
from eprun.memory_check import check_memory
from eprun.nets import NETWORKS
from eprun.nets.base import Network
from eprun.optim import build_optimizer, build_scheduler
from eprun.progress import TrainProgress
from eprun.recipe import Recipe, from_plain, load_recipe, to_yaml
from eprun.rules.base import Rule


class Diverged(EprunError):
    """NaN or Inf appeared; the run stops with status ``diverged``, its last good checkpoint kept."""

    exit_code = 1


class Interrupted(EprunError):
    """SIGINT / SIGTERM: the run stopped at a batch boundary after writing a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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


# --------------------------------------------------------------------------- evaluation


def evaluate(rule, split: Split, batch_size: int, max_batches: int | None = None, world: World = SINGLE,
             exp: Experiment | None = None) -> dict:
    """Accuracy (a fraction) and mean loss of ``rule``'s prediction on ``split`` (with several
    ranks, each scores its share of the split and the sums are combined); replayed from CUDA
    graphs where ``exp``'s plan has them."""
    rows = distributed.shard(len(split), world) if world.parallel else slice(0, len(split))
    sums = torch.zeros(3, dtype=torch.float64, device=split.x.device)  # correct, loss, examples
    for b, start in enumerate(range(rows.start, rows.stop, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        stop = min(start + batch_size, rows.stop)
        x, y = split.x[start:stop], split.y[start:stop]
        scores = _replayed(exp, lambda graphs: graphs.evaluate(x, y)) if exp is not None else None
        if scores is None:
            logits, loss = rule.evaluate(x, y)
            scores = loss.sum().double(), (logits.argmax(dim=1) == y).sum()
        sums[0] += scores[1]
        sums[1] += scores[0]
        sums[2] += len(y)
    correct, loss_sum, n = distributed.all_sum_(sums, world).tolist()
    return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": int(n)}


def _replayed(exp: Experiment, call):
    """``call(exp.graphs)`` where the run replays CUDA graphs; None where it does not, or where a
    capture just failed under ``train.cuda_graphs: auto`` (the step then runs eagerly from now on,
    the reason kept in ``summary.json``). Under ``on`` a failed capture is an error."""
    if exp.graphs is None:
        return None
    try:
        return call(exp.graphs)
    except cuda_graphs.CaptureFailed as failure:
        if exp.graph_plan.mode == "on":
            raise EprunError(f"train.cuda_graphs: on, but a step could not be recorded as a CUDA graph: {failure} "
                             f"(auto falls back to eager steps)") from failure
        exp.graphs_fell_back(failure)
        return None


# --------------------------------------------------------------------------- training state


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


# --------------------------------------------------------------------------- the loop


def batches_per_epoch(recipe: Recipe, n_train: int) -> int:
    n = math.ceil(n_train / recipe.data.batch_size)
    return min(n, recipe.train.max_batches) if recipe.train.max_batches else n


class _StopFlag:
    """SIGINT / SIGTERM request a stop (:mod:`eprun.stopping`): the loop stops at the next batch
    boundary, or sooner where a long computation checks the request. A second signal stops at once."""

    def __init__(self, run_dir: Path, world: World = SINGLE):
        self.run_dir = run_dir
        self.world = world
        self.signum = None
        self._previous = {}

    def __enter__(self):
        stopping.clear()
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: stop now
            raise Interrupted(f"{signal.Signals(signum).name} again: stopped at once; resume from the last "
                              f"checkpoint with: eprun train --resume {self.run_dir}", signum)
        self.signum = signum
        if not self.world.parallel:  # ranks stop together, at a batch boundary they agree on
            stopping.request(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        stopping.clear()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _first_non_finite(exp: Experiment, loss: torch.Tensor) -> str | None:
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


def _check_replayed_steps(exp: Experiment, pos: Position, run_dir: Path) -> None:
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


def run_loop(exp: Experiment, run_dir: Path, pos: Position, window: Window, epoch_window: Window,
             quiet: bool, sinks: runs.MetricSinks) -> None:
    """Train from ``pos`` to the end of the recipe, checkpointing and logging into ``run_dir``
    (and into ``sinks``: ``train.log_to``)."""
    recipe, splits = exp.recipe, exp.splits
    train, bs = splits.train, recipe.data.batch_size
    n_batches = batches_per_epoch(recipe, len(train))
    every = recipe.train.checkpoint_every
    summary = pos.summary
    world = exp.world

    def save_last():
        if world.main:
            runs.save_checkpoint(run_dir / runs.LAST_CHECKPOINT, checkpoint_state(exp, pos, window, epoch_window))

    progress = TrainProgress(recipe.train.epochs * n_batches, quiet, silent=not world.main)
    progress.advance(pos.epoch * n_batches + pos.batch)
    if exp.graph_probe is not None:  # a resumed run's replayed steps are counted from where it resumed
        exp.graph_probe.checked_step = pos.step
    writer = runs.MetricsWriter(run_dir / runs.METRICS_FILE) if world.main else runs.NoMetrics()
    with writer as metrics, progress, _StopFlag(run_dir, world) as stop:
        stop_agreed = False

        def log(record):
            metrics.log(record)
            pos.metrics_records += 1
            sinks.log(record)

        def end_epoch():
            """The end of epoch ``pos.epoch`` (its training done and in the summary): its
            validation, the best and last checkpoints, the summary file, the epoch's line."""
            if pos.val_pending:
                val = evaluate(exp.rule, splits.val, recipe.data.eval_batch_size, world=world, exp=exp)
                pos.val_pending = False
                log({"event": "eval", "split": "val", "epoch": pos.epoch, "step": pos.step, **_scores(val)})
                summary["val_accuracy"] = val["accuracy"]
                if summary.get("best_val_accuracy") is None or val["accuracy"] > summary["best_val_accuracy"]:
                    summary.update(best_val_accuracy=val["accuracy"], best_epoch=pos.epoch)
                    if world.main:
                        runs.save_checkpoint(run_dir / runs.BEST_CHECKPOINT,
                                             checkpoint_state(exp, pos, window, epoch_window))
            save_last()
            if world.main:
                runs.write_summary(run_dir, summary)
            progress.log(_epoch_line(pos.epoch, recipe.train.epochs, summary, summary.get("val_accuracy")))

        if pos.val_pending:  # stopped during the validation of an epoch whose training was kept
            end_epoch()
        while pos.epoch < recipe.train.epochs:
            if pos.batch == 0:
                pos.epoch_shuffle_state = exp.shuffle.get_state()
            else:  # resuming mid-epoch: replay the epoch's permutation
                exp.shuffle.set_state(pos.epoch_shuffle_state)
            order = torch.randperm(len(train), generator=exp.shuffle).to(train.x.device)
            start = time.perf_counter()
            # the log window's own speed counts from here: its training time and the samples it
            # held already (a run resumed mid-window restores them with the checkpoint)
            window_clock, window_held = pos.train_time_s, window.n
            while pos.batch < n_batches:
                idx = order[pos.batch * bs:(pos.batch + 1) * bs]
                x, y = augment(train.x[idx], recipe.data.augment, exp.augment), train.y[idx]
                if world.parallel:  # this rank's shard of the batch, augmented as a whole on every rank
                    world.rows, world.batch = distributed.shard(len(idx), world), len(idx)
                    x, y = x[world.rows], y[world.rows]
                    world.batch_weight = len(y) / len(idx)
                draw = exp.rule.prepare_batch()  # host-side draws (β's sign), before the step, eager or replayed
                # replayed from a CUDA graph (eprun/cuda_graphs.py) unless a monitor reads this batch's .grad
                scores = None if exp.graphs is None or _monitors_due(exp, pos.step + 1) else _replayed(
                    exp, lambda graphs: graphs.step(x, y, draw))
                if scores is not None:  # zeroed .grad, the step, its scores, the probe, the optimiser step
                    window.add_device_sums(*scores, len(y))
                    epoch_window.add_device_sums(*scores, len(y))
                    stop_agreed = stop.signum is not None
                else:
                    _check_replayed_steps(exp, pos, run_dir)  # an eager batch starts from what replays left
                    exp.optimizer.zero_grad(set_to_none=False)
                    logits, loss = exp.rule.train_step(x, y)
                    where = _first_non_finite(exp, loss)
                    if world.parallel:  # scores, divergence and stop requests, combined over the ranks
                        sums = distributed.all_sum_(torch.tensor(
                            [float(loss.sum()), float((logits.argmax(dim=1) == y).sum()), float(len(y)),
                             float(where is not None), float(stop.signum is not None)], dtype=torch.float64), world)
                        if sums[3] > 0 and where is None:
                            where = "another rank's batch shard"
                        stop_agreed = bool(sums[4] > 0)
                    if where is not None:
                        message = (f"diverged at epoch {pos.epoch + 1}, batch {pos.batch + 1} (step {pos.step + 1}): "
                                   f"NaN/Inf in {where}; the last good checkpoint is {run_dir / runs.LAST_CHECKPOINT}")
                        summary.update(status="diverged", error=message)
                        raise Diverged(message)
                    if world.main:
                        _monitor(exp, x, y, pos, n_batches, log, progress)
                    if not exp.rule.steps_optimizer:
                        exp.optimizer.step()
                    if world.parallel:  # sums: loss, correct, examples (as summed above)
                        window.add_sums(float(sums[0]), int(sums[1]), int(sums[2]))
                        epoch_window.add_sums(float(sums[0]), int(sums[1]), int(sums[2]))
                    else:
                        window.add(logits, loss, y)
                        epoch_window.add(logits, loss, y)
                        stop_agreed = stop.signum is not None
                pos.batch += 1
                pos.step += 1
                progress.advance()
                mid_epoch = pos.batch < n_batches  # at the epoch's end the epoch-end checkpoint follows
                stopping = stop_agreed and mid_epoch
                log_now = pos.batch % recipe.train.log_every == 0 or pos.batch == n_batches
                save_now = mid_epoch and (stopping or (every and pos.step % every == 0))
                if log_now or save_now:  # replayed steps are checked before anything is logged or saved
                    _check_replayed_steps(exp, pos, run_dir)
                if log_now:
                    stats = window.flush()
                    elapsed = pos.train_time_s + time.perf_counter() - start
                    stats["samples_per_s"] = (pos.samples + epoch_window.n) / elapsed if elapsed > 0 else 0.0
                    window_s = elapsed - window_clock
                    stats["window_samples_per_s"] = (stats["samples"] - window_held) / window_s if window_s > 0 else 0.0
                    window_clock, window_held = elapsed, 0
                    epoch_float = pos.epoch + pos.batch / n_batches
                    progress.show(epoch_float, stats["loss"], stats["accuracy"], stats["window_samples_per_s"])
                    stats.update(exp.net.monitor())  # e.g. vector-field nets: angle between B_n and W_nᵀ
                    stats.update(exp.rule.log_stats())  # e.g. EP with tol: steps the phases took
                    log({"event": "train", "epoch": epoch_float, "step": pos.step, **stats})
                if save_now:
                    pos.train_time_s += time.perf_counter() - start
                    start = time.perf_counter()
                    save_last()
                if stopping:
                    name = signal.Signals(stop.signum or signal.SIGTERM).name
                    summary.update(status="interrupted", interrupted_by=name)
                    raise Interrupted(f"{name}: stopped at epoch {pos.epoch + 1}, batch {pos.batch}; "
                                      f"resume with: eprun train --resume {run_dir}", stop.signum)
            pos.train_time_s += time.perf_counter() - start
            stats = epoch_window.flush()
            pos.samples += stats["samples"]
            if exp.scheduler is not None:
                exp.scheduler.step()
            pos.epoch, pos.batch = pos.epoch + 1, 0
            if exp.net.has_dynamics:  # the engine of the epoch's last relaxation in training (not scoring's)
                summary["relaxation_engine"] = exp.net.last_relax_engine
            summary.update(epochs_completed=pos.epoch, train_accuracy=stats["accuracy"], train_loss=stats["loss"],
                           train_time_s=pos.train_time_s,
                           samples_per_s=pos.samples / pos.train_time_s if pos.train_time_s > 0 else 0.0)
            if splits.val is not None:  # the epoch's training is kept whatever stops its validation
                pos.val_pending = True
                save_last()
            end_epoch()
            if stop_agreed:
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                summary.update(status="interrupted", interrupted_by=name)
                raise Interrupted(f"{name}: stopped after epoch {pos.epoch}; resume with: "
                                  f"eprun train --resume {run_dir}", stop.signum)
        test = evaluate(exp.rule, splits.test, recipe.data.eval_batch_size, world=world, exp=exp)
        log({"event": "eval", "split": "test", "epoch": pos.epoch, "step": pos.step, **_scores(test)})
        summary.update(status="finished", test_accuracy=test["accuracy"], test_loss=test["loss"])


def _monitor(exp: Experiment, x, y, pos: Position, n_batches: int, log, progress) -> None:
    """``train.gdu_every`` / ``train.diagnostics_every`` / ``train.alignment_every``: log the
    update's angle to the BPTT gradient, the relaxation's convergence, or target propagation's
    alignment with BP, on this batch (before the optimiser step)."""
    from eprun import diagnostics

    cfg = exp.recipe.train
    relaxation = exp.recipe.rule.relaxation()
    step = pos.step + 1
    due = _monitors_due(exp, step)
    record = {"epoch": pos.epoch + (pos.batch + 1) / n_batches, "step": step}
    if "alignment" in due:
        log({"event": "alignment", **record, **exp.rule.alignment(x, y, seed=step)})
    if "gdu" in due:
        log({"event": "gdu", **record, **diagnostics.update_angles(exp.net, x, y, relaxation.T)})
    if "diagnostics" in due:
        found = diagnostics.relaxation(exp.net, x, y, relaxation.T, relaxation.K or 1, relaxation.beta or 0.0)
        log({"event": "diagnostics", **record, **found})
        if found["free_residual"] > cfg.convergence_tol:
            warning = (f"free phase not converged at step {step}: residual {found['free_residual']:.2e} > "
                       f"train.convergence_tol {cfg.convergence_tol:.0e} (raise rule.T?)")
            _add_warning(pos.summary, warning)
            progress.log(f"warning: {warning}")


def _monitors_due(exp: Experiment, step: int) -> set[str]:
    """The monitors of :func:`_monitor` that log at training step ``step`` (1-based)."""
    cfg, due = exp.recipe.train, set()
    if cfg.alignment_every and step % cfg.alignment_every == 0 and exp.rule.measures_alignment:
        due.add("alignment")
    if exp.recipe.rule.relaxation() is not None:
        if cfg.gdu_every and step % cfg.gdu_every == 0:
            due.add("gdu")
        if cfg.diagnostics_every and step % cfg.diagnostics_every == 0:
            due.add("diagnostics")
    return due


def _add_warning(summary: dict, warning: str) -> None:
    """Keep ``warning`` in the summary (the first 20 of a run)."""
    summary.setdefault("warnings", [])
    if len(summary["warnings"]) < 20:
        summary["warnings"].append(warning)


def _open_sinks(exp: Experiment, run_dir: Path, summary: dict) -> runs.MetricSinks:
    """``train.log_to``'s sinks; a sink's failure is one warning line on stderr (printed through
    the progress display while it runs) and one in the summary, and the run goes on."""
    console = Console(stderr=True)

    def warn(text: str) -> None:
        _add_warning(summary, text)
        console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)

    wanted = exp.recipe.train.log_to if exp.world.main else []  # rank 0 alone writes
    return runs.open_sinks(wanted, run_dir, schema.to_plain(exp.recipe), warn)


def _finish(run_dir: Path, recipe: Recipe, summary: dict, wall_start: float, wall_before: float) -> None:
    """Write the final summary and the plots (learning curves; alignment with BP where logged),
    whatever the outcome."""
    summary["wall_time_s"] = wall_before + time.perf_counter() - wall_start
    summary.setdefault("best_val_accuracy", None)
    try:
        runs.write_summary(run_dir, summary)
        metrics = runs.read_metrics(run_dir / runs.METRICS_FILE)
        plots.plot_curves(metrics, run_dir / runs.PLOTS_DIR / "curves.png", title=recipe.name)
        plots.plot_alignment(metrics, run_dir / runs.PLOTS_DIR / "alignment.png", title=recipe.name)
    except OSError as exc:
        if summary.get("status") == "finished":  # the run went well: this failure is the one to report
            error = _storage_failure(run_dir, summary, exc)
            _write_summary_if_possible(run_dir, summary)
            raise error from None
        _write_summary_if_possible(run_dir, summary)  # another error is on its way out


def _write_summary_if_possible(run_dir: Path, summary: dict) -> None:
    try:
        runs.write_summary(run_dir, summary)
    except OSError:
        pass


def _drive(exp: Experiment, run_dir: Path, pos: Position, window: Window, epoch_window: Window,
           quiet: bool, wall_before: float) -> Path:
    """Run the loop with the run's lock held by the caller; whatever the outcome, write the
    final summary and the plots."""
    wall_start = time.perf_counter()
    sinks = _open_sinks(exp, run_dir, pos.summary)
    pos.summary["status"] = "running"
    if exp.world.main:
        runs.write_summary(run_dir, pos.summary)
    try:
        run_loop(exp, run_dir, pos, window, epoch_window, quiet, sinks)
    except stopping.StopRequested as exc:  # inside a batch or an evaluation: that work is dropped
        name = signal.Signals(exc.signum).name
        pos.summary.update(status="interrupted", interrupted_by=name)
        if pos.val_pending:
            where = f"the validation of epoch {pos.epoch} (its training is kept; the resumed run validates it first)"
        elif pos.epoch >= exp.recipe.train.epochs:
            where = "the test scoring (every epoch is kept; the resumed run scores the test set)"
        else:
            where = (f"epoch {pos.epoch + 1}, batch {pos.batch + 1} (that batch is dropped; the run resumes "
                     f"from its last checkpoint)")
        raise Interrupted(f"{name}: stopped during {where}; resume with: eprun train --resume {run_dir}",
                          exc.signum) from None
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.exit_code - 128 if isinstance(exc, Interrupted) else signal.SIGINT
        pos.summary.update(status="interrupted", interrupted_by=signal.Signals(signum).name)
        raise
    except OSError as exc:
        raise _storage_failure(run_dir, pos.summary, exc) from None
    except BaseException as exc:
        if pos.summary.get("status") == "running":
            pos.summary.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        try:
            pos.summary["cuda_graphs"] = exp.graph_plan.record()  # a capture that failed under auto says so here
            if exp.world.main:
                _finish(run_dir, exp.recipe, pos.summary, wall_start, wall_before)
        finally:
            sinks.close(pos.summary["status"])  # after _finish, which may still turn "finished" to "failed"
    return run_dir


def _storage_failure(run_dir: Path, summary: dict, exc: OSError) -> StorageError:
    """A write into the run failed (disk full, file-size limit…): status ``failed`` with the reason;
    the checkpoint written before is whole (atomic writes), and the run resumes once space is back."""
    reason = f"could not write {exc.filename or run_dir}: {exc.strerror or exc}"
    summary.update(status="failed", error=reason)
    last = run_dir / runs.LAST_CHECKPOINT
    after = (f"the last good checkpoint is {last}; free space and resume with: eprun train --resume {run_dir}"
             if last.exists() else "no checkpoint was written; free space and start the run again")
    return StorageError(f"{reason}; the run stopped (status failed); {after}")


def _join(recipe: Recipe) -> tuple[World, torch.device]:
    """This process's rank (a single process outside torchrun) and its device: with several
    ranks on CUDA, the GPU of the rank's local index."""
    device = resolve_device(recipe.device)
    world = distributed.join(device.type)
    if world.parallel and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return world, device


def train(recipe: Recipe, out_parent: Path, *, quiet: bool = False, argv: list[str] | None = None) -> Path:
    """Train a recipe into a new run directory and return its path. Launched by torchrun, every
    rank trains its shard of each batch (:mod:`eprun.distributed`) and rank 0 writes the run."""
    world, device = _join(recipe)
    splits = load_data(recipe, device)  # data errors surface before anything is written
    exp = assemble(recipe, splits, device, world)
    if not world.main:
        run_dir = Path(distributed.broadcast_text(None, world))
        pos, window, epoch_window = Position(summary={}), Window(device), Window(device)
        return _drive(exp, run_dir, pos, window, epoch_window, quiet, wall_before=0.0)
    run_dir = runs.create_run_dir(Path(out_parent), recipe.name)
    distributed.broadcast_text(str(run_dir), world)
    with runs.RunLock(run_dir):
        runs.atomic_write_text(run_dir / runs.RECIPE_FILE, to_yaml(recipe))
        runs.write_env(run_dir, device=str(device), argv=list(argv if argv is not None else sys.argv),
                       extra={**world.describe(), "cuda_graphs": exp.graph_plan.record()})
        summary = {"status": "running", "name": recipe.name, "model": recipe.model.kind,
                   "rule": recipe.rule.label(), "dataset": recipe.data.dataset, "seed": recipe.seed,
                   "device": str(device), "epochs": recipe.train.epochs, "epochs_completed": 0,
                   "n_train": len(splits.train), "n_val": len(splits.val) if splits.val else 0,
                   "n_test": len(splits.test)}
        runs.write_summary(run_dir, summary)
        pos, window, epoch_window = Position(summary=summary), Window(device), Window(device)
        # a step-0 checkpoint: a run killed at any moment, even before its first batch, resumes
        try:
            runs.save_checkpoint(run_dir / runs.LAST_CHECKPOINT, checkpoint_state(exp, pos, window, epoch_window))
        except OSError as exc:
            error = _storage_failure(run_dir, summary, exc)
            _write_summary_if_possible(run_dir, summary)
            raise error from None
        return _drive(exp, run_dir, pos, window, epoch_window, quiet, wall_before=0.0)


def paired_recipe(recipe: Recipe) -> Recipe | None:
    """The twin of a recipe whose rule names one (``rule.pair_with: bptt``): same seed (so the
    same initial weights and data order), same network, the rule swapped for the paired one."""
    twin_rule = recipe.rule.paired_rule()
    if twin_rule is None:
        return None
    plain = schema.to_plain(recipe)
    plain["name"] = f"{recipe.name}-{twin_rule.kind}"
    plain["rule"] = schema.to_plain(twin_rule)
    return from_plain(plain, f"{recipe.name} (paired {twin_rule.kind} run)")


def resume(run_path: Path, *, force: bool = False, overrides: list[str] = (), quiet: bool = False) -> Path:
    """Continue an interrupted or killed run from ``checkpoints/last.pt``, in the same directory.

    A recipe edited since the run started (its ``recipe.yaml`` or ``overrides``) is refused
    unless ``force``; with ``force`` the edit is recorded in ``summary.json``.
    """
    run_dir = runs.run_dir_of(Path(run_path))
    if not distributed.launched():
        with runs.RunLock(run_dir):  # before anything in the run is read or touched: a second resumer changes nothing
            return _resume_locked(run_dir, force, list(overrides), quiet, SINGLE)
    world, _ = _join(load_recipe(run_dir / runs.RECIPE_FILE, list(overrides)))
    if not world.main:  # rank 0 holds the lock and checks the run; the others follow its verdict
        verdict = distributed.broadcast_text(None, world)
        if verdict != "ok":
            raise RunDirError(verdict)
        return _resume_locked(run_dir, force, list(overrides), quiet, world)
    with runs.RunLock(run_dir):
        try:
            _check_resumable(run_dir, force, list(overrides), world)
        except EprunError as error:
            distributed.broadcast_text(f"rank 0 refused the resume: {error}", world)
            raise
        distributed.broadcast_text("ok", world)
        return _resume_locked(run_dir, force, list(overrides), quiet, world)


def _check_resumable(run_dir: Path, force: bool, overrides: list[str], world: World):
    """The run's summary, last checkpoint, recipe and whether it was edited, once checked:
    not finished, a checkpoint to resume from, the recipe unedited (or ``force``), the same
    number of ranks as it was trained on (or ``force``)."""
    summary_now = runs.read_summary(run_dir) if (run_dir / runs.SUMMARY_FILE).exists() else {}
    if summary_now.get("status") == "finished":
        raise RunDirError(f"{run_dir}: the run has finished; there is nothing to resume")
    last = run_dir / runs.LAST_CHECKPOINT
    if not last.exists():
        raise RunDirError(f"{run_dir}: no {runs.LAST_CHECKPOINT} to resume from (the run was stopped before "
                          f"it started training; start it again)")
    state = runs.load_checkpoint(last)
    recipe = load_recipe(run_dir / runs.RECIPE_FILE, overrides)
    original = from_plain(state["recipe"], f"{last} (embedded recipe)")
    edited = schema.to_plain(recipe) != schema.to_plain(original)
    if edited and not force:
        raise RecipeError(f"{run_dir / runs.RECIPE_FILE}: the recipe differs from the one the run was started "
                          f"with ({_first_difference(schema.to_plain(original), schema.to_plain(recipe))}); "
                          f"resume with --force to continue with the edited recipe")
    trained_on = int(state.get("world_size", 1))
    if trained_on != world.size and not force:
        raise RunDirError(f"{run_dir}: the run was trained by {trained_on} process(es), this launch has "
                          f"{world.size}; resume it with the same number (torchrun --nproc_per_node={trained_on}), "
                          f"or --force to continue with {world.size} (the same maths, other rounding)")
    return summary_now, state, recipe, edited


def _resume_locked(run_dir: Path, force: bool, overrides: list[str], quiet: bool, world: World) -> Path:
    summary_now, state, recipe, edited = _check_resumable(run_dir, force, overrides, world)
    last = run_dir / runs.LAST_CHECKPOINT
    device = _join(recipe)[1] if world.parallel else resolve_device(recipe.device)
    splits = load_data(recipe, device)
    exp = assemble(recipe, splits, device, world)
    window, epoch_window = Window(device), Window(device)
    pos = restore(exp, state, window, epoch_window, str(last))
    if world.main:
        runs.truncate_metrics(run_dir / runs.METRICS_FILE, pos.metrics_records)
        resumes = list(pos.summary.get("resumes", []))
        resumes.append({"from_step": pos.step, "epoch": pos.epoch, "batch": pos.batch,
                        "edited_recipe": edited, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        pos.summary["resumes"] = resumes
        if edited:
            runs.atomic_write_text(run_dir / runs.RECIPE_FILE, to_yaml(recipe))
    wall_before = float(summary_now.get("wall_time_s") or 0.0)
    return _drive(exp, run_dir, pos, window, epoch_window, quiet, wall_before)


def _first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path}: {a!r} → {b!r}"


def _scores(result: dict) -> dict:
    return {"loss": result["loss"], "accuracy": result["accuracy"], "n": result["n"]}


def _epoch_line(epoch: int, epochs: int, summary: dict, val_acc) -> str:
    val = f"  val acc {val_acc:.4f}" if val_acc is not None else ""
    return (f"epoch {epoch}/{epochs}: train loss {summary['train_loss']:.4f}  "
            f"train acc {summary['train_accuracy']:.4f}{val}")


# --------------------------------------------------------------------------- fast dev run


def fast_dev_run(recipe: Recipe) -> dict:
    """Two training batches and one evaluation batch on synthetic data shaped like the dataset.

    Validates that the recipe assembles and runs end to end — network, rule, optimiser,
    schedule, augmentation — in seconds: batches of at most 4 examples, relaxations of at most
    T = 5, K = 3 steps, at most 2 feedback iterations per layer for target propagation. Needs
    no data files and writes nothing.
    """
    recipe = _shrunk(recipe)
    device = resolve_device(recipe.device)
    splits = synthetic_like(recipe.data.dataset, 2 * recipe.data.batch_size, recipe.seed, device)
    exp = assemble(recipe, splits, device)
    losses = []
    for b in range(2):
        x = splits.train.x[b * recipe.data.batch_size:(b + 1) * recipe.data.batch_size]
        y = splits.train.y[b * recipe.data.batch_size:(b + 1) * recipe.data.batch_size]
        exp.optimizer.zero_grad(set_to_none=False)
        _, loss = exp.rule.train_step(x, y)
        where = _first_non_finite(exp, loss)
        if where is not None:
            raise Diverged(f"fast-dev-run: NaN/Inf in {where} at batch {b + 1}")
        if not exp.rule.steps_optimizer:
            exp.optimizer.step()
        losses.append(float(loss.mean()))
    result = evaluate(exp.rule, splits.test, recipe.data.eval_batch_size, max_batches=1)
    return {"train_losses": losses, **result}


def _shrunk(recipe: Recipe) -> Recipe:
    plain = schema.to_plain(recipe)
    plain["data"]["batch_size"] = min(plain["data"]["batch_size"], 4)
    plain["data"]["eval_batch_size"] = min(plain["data"]["eval_batch_size"], 4)
    for key, cap in (("T", 5), ("K", 3), ("feedback_iterations", 2)):
        value = plain["rule"].get(key)
        if isinstance(value, list):
            plain["rule"][key] = [min(v, cap) for v in value]
        elif value is not None:
            plain["rule"][key] = min(value, cap)
    shrunk = from_plain(plain, f"{recipe.name} (fast-dev-run)")
    shrunk.source = recipe.source or recipe.name
    return shrunk


# --------------------------------------------------------------------------- checkpoint evaluation


def evaluate_checkpoint(checkpoint: Path, split: str = "test", recipe_path: Path | None = None,
                        device: str | None = None) -> dict:
    """Rebuild the network of a checkpoint and score it on ``split``. The recipe is ``recipe_path``
    (a file or a bundled name), else the recipe.yaml of the run the checkpoint is in, else the one
    embedded in the checkpoint (a checkpoint copied out of its run). Weights holding NaN or Inf are
    refused: there is nothing to score."""
    state = runs.load_checkpoint(Path(checkpoint))
    run_recipe = _run_recipe_of(Path(checkpoint))
    if recipe_path is not None:
        recipe = load_recipe(catalog.resolve(str(recipe_path)))
    elif run_recipe is not None:
        recipe = load_recipe(run_recipe)
    elif "recipe" in state:
        recipe = from_plain(state["recipe"], f"{checkpoint} (embedded recipe)")
    else:
        raise CheckpointError(f"{checkpoint}: no recipe in its run or in the checkpoint; pass --recipe")
    dev = resolve_device(device or recipe.device)
    splits = load_data(recipe, dev)
    exp = assemble(recipe, splits, dev)
    try:
        exp.net.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{checkpoint}: does not fit the recipe's network ({first})") from None
    for name, p in exp.net.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{checkpoint}: the weights hold NaN or Inf ({name}); the run that wrote them "
                                  f"diverged, and there is nothing to score")
    target = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if target is None:
        raise EprunError(f"{checkpoint}: the run has no validation split (data.val_size: 0)")
    result = evaluate(exp.rule, target, recipe.data.eval_batch_size)
    loss = result["loss"] if math.isfinite(result["loss"]) else None  # JSON has no NaN or Inf
    return {"accuracy": result["accuracy"], "loss": loss, "split": split, "n": result["n"]}


def _run_recipe_of(checkpoint: Path) -> Path | None:
    """The recipe.yaml of the run a checkpoint lies in, or None outside a run."""
    try:
        path = runs.run_dir_of(checkpoint) / runs.RECIPE_FILE
    except RunDirError:
        return None
    return path if path.exists() else None
