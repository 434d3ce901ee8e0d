"""The training loop: the only place that loops over epochs.

For each epoch: shuffle, step the rule and the optimiser on every batch (eager, or replayed from
CUDA graphs), log each window, checkpoint; train the epoch to its end, checkpoint it, then score
the validation split; finally score the test split with the final model. A stop requested by a
signal ends the loop at a batch boundary, after a checkpoint.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from eprun import distributed, runs
from eprun.data.augment import augment
from eprun.progress import TrainProgress
from eprun.runner.divergence import Diverged, check_replayed_steps, first_non_finite
from eprun.runner.evaluation import evaluate, replayed
from eprun.runner.experiment import Experiment
from eprun.runner.monitors import monitor, monitors_due
from eprun.runner.state import Position, Window, batches_per_epoch, checkpoint_state
from eprun.runner.stop_signals import Interrupted, StopSignals


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
    with writer as metrics, progress, StopSignals(run_dir, world) as stop:
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
                scores = None if exp.graphs is None or monitors_due(exp, pos.step + 1) else replayed(
                    exp, lambda graphs: graphs.step(x, y, draw))
                if scores is not None:  # zeroed .grad, the step, its scores, the probe, the optimiser step
                    window.add_device_sums(*scores, len(y))
                    epoch_window.add_device_sums(*scores, len(y))
                    stop_agreed = stop.signum is not None
                else:
                    check_replayed_steps(exp, pos, run_dir)  # an eager batch starts from what replays left
                    exp.optimizer.zero_grad(set_to_none=False)
                    logits, loss = exp.rule.train_step(x, y)
                    where = first_non_finite(exp, loss)
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
                        monitor(exp, x, y, pos, n_batches, log, progress)
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
                    check_replayed_steps(exp, pos, run_dir)
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
                    raise _interrupted(summary, stop, f"at epoch {pos.epoch + 1}, batch {pos.batch}", run_dir)
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
                raise _interrupted(summary, stop, f"after epoch {pos.epoch}", run_dir)
        test = evaluate(exp.rule, splits.test, recipe.data.eval_batch_size, world=world, exp=exp)
        log({"event": "eval", "split": "test", "epoch": pos.epoch, "step": pos.step, **_scores(test)})
        summary.update(status="finished", test_accuracy=test["accuracy"], test_loss=test["loss"])


def _interrupted(summary: dict, stop: StopSignals, where: str, run_dir: Path) -> Interrupted:
    """The stop a signal asked for, made at a batch boundary ``where`` after a checkpoint: the
    summary says so, and the error says how to resume."""
    name = signal.Signals(stop.signum or signal.SIGTERM).name
    summary.update(status="interrupted", interrupted_by=name)
    return Interrupted(f"{name}: stopped {where}; resume with: eprun train --resume {run_dir}", stop.signum)


def _scores(result: dict) -> dict:
    return {"loss": result["loss"], "accuracy": result["accuracy"], "n": result["n"]}


def _epoch_line(epoch: int, epochs: int, summary: dict, val_acc) -> str:
    val = f"  val acc {val_acc:.4f}" if val_acc is not None else ""
    return (f"epoch {epoch}/{epochs}: train loss {summary['train_loss']:.4f}  "
            f"train acc {summary['train_accuracy']:.4f}{val}")
