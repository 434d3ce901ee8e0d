"""Training and evaluation loops: the only place that loops over epochs and writes run files.

``train`` reads top to bottom: load data, assemble the experiment, create the run
directory, then for each epoch shuffle, step the rule and the optimiser on every batch,
score the validation split, checkpoint; finally score the test split with the final model.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eprun import plots, runs, schema
from eprun.assemble import build_network, build_rule, generator, resolve_device
from eprun.data import Split, Splits, load_splits, synthetic_like
from eprun.errors import CheckpointError, EprunError
from eprun.optim import build_optimizer, build_scheduler
from eprun.progress import TrainProgress
from eprun.recipe import Recipe, from_plain, to_yaml


@dataclass
class Experiment:
    """Everything a recipe assembles into, on one device."""

    recipe: Recipe
    device: torch.device
    splits: Splits
    net: torch.nn.Module
    rule: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    shuffle: torch.Generator

    def state_dict(self, **counters) -> dict:
        """A checkpoint: tensors and plain data only (loadable with ``weights_only=True``)."""
        return {
            "recipe": schema.to_plain(self.recipe),
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rule": self.rule.state_dict(),
            "rng": {"shuffle": self.shuffle.get_state(), "torch": torch.get_rng_state()},
            **counters,
        }


class Diverged(EprunError):
    exit_code = 1


def load_data(recipe: Recipe, device: torch.device) -> Splits:
    data = recipe.data
    return load_splits(
        data.dataset, root=data.root, val_size=data.val_size, split_seed=recipe.seed,
        normalize=data.normalize, device=device, train_subset=data.train_subset,
    )


def assemble(recipe: Recipe, splits: Splits, device: torch.device) -> Experiment:
    torch.manual_seed(recipe.seed)
    info = splits.info
    net = build_network(recipe, info.input_shape, info.num_classes, device)
    rule = build_rule(recipe, net)
    optimizer = build_optimizer(recipe.optim, net.layer_groups())
    scheduler = build_scheduler(recipe.schedule, optimizer, recipe.train.epochs)
    return Experiment(recipe, device, splits, net, rule, optimizer, scheduler,
                      generator(recipe.seed, "shuffle"))


# --------------------------------------------------------------------------- evaluation


def evaluate(rule, split: Split, batch_size: int, max_batches: int | None = None) -> dict:
    """Accuracy (a fraction) and mean loss of ``rule``'s prediction on ``split``."""
    correct = torch.zeros((), dtype=torch.long, device=split.x.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.x.device)
    n = 0
    for b, start in enumerate(range(0, len(split), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x, y = split.x[start:start + batch_size], split.y[start:start + batch_size]
        logits, loss = rule.evaluate(x, y)
        correct += (logits.argmax(dim=1) == y).sum()
        loss_sum += loss.sum().double()
        n += len(y)
    return {"accuracy": int(correct) / max(n, 1), "loss": float(loss_sum) / max(n, 1), "n": n}


# --------------------------------------------------------------------------- training


def batches_per_epoch(recipe: Recipe, n_train: int) -> int:
    n = math.ceil(n_train / recipe.data.batch_size)
    return min(n, recipe.train.max_batches) if recipe.train.max_batches else n


def train_epoch(exp: Experiment, epoch: int, step: int, progress: TrainProgress, log) -> tuple[int, dict]:
    """One pass over the shuffled training split; returns the new global step and epoch stats."""
    recipe, train = exp.recipe, exp.splits.train
    bs, n_batches = recipe.data.batch_size, batches_per_epoch(recipe, len(train))
    order = torch.randperm(len(train), generator=exp.shuffle).to(train.x.device)
    window = _Window(train.x.device)
    epoch_stats = _Window(train.x.device)
    start = time.perf_counter()
    for b in range(n_batches):
        idx = order[b * bs:(b + 1) * bs]
        x, y = train.x[idx], train.y[idx]
        exp.optimizer.zero_grad(set_to_none=False)
        logits, loss = exp.rule.train_step(x, y)
        exp.optimizer.step()
        window.add(logits, loss, y)
        epoch_stats.add(logits, loss, y)
        step += 1
        progress.advance()
        if (b + 1) % recipe.train.log_every == 0 or b + 1 == n_batches:
            stats = window.flush()
            if not math.isfinite(stats["loss"]):
                raise Diverged(f"training diverged: non-finite loss at epoch {epoch + 1}, batch {b + 1}")
            elapsed = time.perf_counter() - start
            stats["samples_per_s"] = epoch_stats.n / elapsed if elapsed > 0 else 0.0
            progress.show(epoch + (b + 1) / n_batches, stats["loss"], stats["accuracy"], stats["samples_per_s"])
            log({"event": "train", "epoch": epoch + (b + 1) / n_batches, "step": step, **stats})
    elapsed = time.perf_counter() - start
    stats = epoch_stats.flush()
    stats["time_s"] = elapsed
    return step, stats


class _Window:
    """Running sums of loss and correct predictions, kept on the device (no sync per batch)."""

    def __init__(self, device):
        self.device = device
        self._reset()

    def _reset(self):
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.n = 0

    def add(self, logits, loss, y):
        self.loss += loss.sum().double()
        self.correct += (logits.argmax(dim=1) == y).sum()
        self.n += len(y)

    def flush(self) -> dict:
        out = {"loss": float(self.loss) / max(self.n, 1), "accuracy": int(self.correct) / max(self.n, 1),
               "samples": self.n}
        self._reset()
        return out


def train(recipe: Recipe, out_parent: Path, *, quiet: bool = False, argv: list[str] | None = None) -> Path:
    """Train a recipe into a new run directory and return its path."""
    wall_start = time.perf_counter()
    device = resolve_device(recipe.device)
    splits = load_data(recipe, device)  # data errors surface before anything is written
    exp = assemble(recipe, splits, device)
    run_dir = runs.create_run_dir(Path(out_parent), recipe.name)
    runs.atomic_write_text(run_dir / "recipe.yaml", to_yaml(recipe))
    runs.write_env(run_dir, device=str(device), argv=list(argv if argv is not None else sys.argv))
    summary = {"status": "running", "name": recipe.name, "model": recipe.model.kind,
               "rule": _rule_label(recipe), "dataset": recipe.data.dataset, "seed": recipe.seed,
               "device": str(device), "epochs": recipe.train.epochs, "epochs_completed": 0,
               "n_train": len(splits.train), "n_val": len(splits.val) if splits.val else 0,
               "n_test": len(splits.test)}
    runs.write_summary(run_dir, summary)
    total = recipe.train.epochs * batches_per_epoch(recipe, len(splits.train))
    progress = TrainProgress(total, quiet)
    step, best_val, train_time, samples = 0, None, 0.0, 0
    with runs.MetricsWriter(run_dir / "metrics.jsonl") as metrics, progress:
        try:
            for epoch in range(recipe.train.epochs):
                step, stats = train_epoch(exp, epoch, step, progress, metrics.log)
                train_time += stats["time_s"]
                samples += stats["samples"]
                if exp.scheduler is not None:
                    exp.scheduler.step()
                record = {"epoch": epoch + 1, "step": step}
                if splits.val is not None:
                    val = evaluate(exp.rule, splits.val, recipe.data.eval_batch_size)
                    metrics.log({"event": "eval", "split": "val", **record, **_scores(val)})
                    if best_val is None or val["accuracy"] > best_val:
                        best_val = val["accuracy"]
                        summary.update(best_val_accuracy=best_val, best_epoch=epoch + 1)
                        runs.save_checkpoint(run_dir / "checkpoints" / "best.pt",
                                             exp.state_dict(epoch=epoch + 1, step=step, best_val_accuracy=best_val))
                    summary["val_accuracy"] = val["accuracy"]
                runs.save_checkpoint(run_dir / "checkpoints" / "last.pt",
                                     exp.state_dict(epoch=epoch + 1, step=step, best_val_accuracy=best_val))
                summary.update(epochs_completed=epoch + 1, train_accuracy=stats["accuracy"],
                               train_loss=stats["loss"], train_time_s=train_time,
                               samples_per_s=samples / train_time if train_time > 0 else 0.0,
                               wall_time_s=time.perf_counter() - wall_start)
                runs.write_summary(run_dir, summary)
                progress.log(_epoch_line(epoch + 1, recipe.train.epochs, stats, summary.get("val_accuracy")))
            test = evaluate(exp.rule, splits.test, recipe.data.eval_batch_size)
            metrics.log({"event": "eval", "split": "test", "epoch": recipe.train.epochs, "step": step, **_scores(test)})
            summary.update(status="finished", test_accuracy=test["accuracy"], test_loss=test["loss"])
        except Diverged as exc:
            summary.update(status="diverged", error=str(exc))
            raise
        except KeyboardInterrupt:
            summary.update(status="interrupted")
            raise
        finally:
            summary["wall_time_s"] = time.perf_counter() - wall_start
            summary.setdefault("best_val_accuracy", None)
            runs.write_summary(run_dir, summary)
            plots.plot_curves(runs.read_metrics(run_dir / "metrics.jsonl"), run_dir / "plots" / "curves.png",
                              title=recipe.name)
    return run_dir


def _scores(result: dict) -> dict:
    return {"loss": result["loss"], "accuracy": result["accuracy"], "n": result["n"]}


def _rule_label(recipe: Recipe) -> str:
    estimator = getattr(recipe.rule, "estimator", None)
    return f"{recipe.rule.kind}/{estimator}" if estimator else recipe.rule.kind


def _epoch_line(epoch: int, epochs: int, stats: dict, val_acc) -> str:
    val = f"  val acc {val_acc:.4f}" if val_acc is not None else ""
    return (f"epoch {epoch}/{epochs}: train loss {stats['loss']:.4f}  train acc {stats['accuracy']:.4f}"
            f"{val}  ({stats['samples'] / stats['time_s']:,.0f} samples/s)")


# --------------------------------------------------------------------------- fast dev run


def fast_dev_run(recipe: Recipe) -> dict:
    """Two training batches and one evaluation batch on synthetic data shaped like the dataset.

    Validates that the recipe assembles and runs end to end; needs no data files and writes nothing.
    """
    device = resolve_device(recipe.device)
    splits = synthetic_like(recipe.data.dataset, 2 * recipe.data.batch_size, recipe.seed, device)
    exp = assemble(recipe, splits, device)
    losses = []
    for b in range(2):
        x = splits.train.x[b * recipe.data.batch_size:(b + 1) * recipe.data.batch_size]
        y = splits.train.y[b * recipe.data.batch_size:(b + 1) * recipe.data.batch_size]
        exp.optimizer.zero_grad(set_to_none=False)
        _, loss = exp.rule.train_step(x, y)
        exp.optimizer.step()
        losses.append(float(loss.mean()))
    result = evaluate(exp.rule, splits.test, recipe.data.eval_batch_size, max_batches=1)
    if not all(math.isfinite(v) for v in losses + [result["loss"]]):
        raise Diverged(f"fast-dev-run: non-finite loss {losses + [result['loss']]}")
    return {"train_losses": losses, **result}


# --------------------------------------------------------------------------- checkpoint evaluation


def evaluate_checkpoint(checkpoint: Path, split: str = "test", recipe_path: Path | None = None,
                        device: str | None = None) -> dict:
    """Rebuild the network of a checkpoint's run (or of ``recipe_path``) and score it on ``split``."""
    from eprun.recipe import load_recipe

    state = runs.load_checkpoint(Path(checkpoint))
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
    else:
        try:
            recipe = load_recipe(runs.run_dir_of(Path(checkpoint)) / "recipe.yaml")
        except EprunError:
            if "recipe" not in state:
                raise CheckpointError(f"{checkpoint}: no recipe in its run or in the checkpoint; pass --recipe")
            recipe = from_plain(state["recipe"], f"{checkpoint} (embedded recipe)")
    dev = resolve_device(device or recipe.device)
    splits = load_data(recipe, dev)
    exp = assemble(recipe, splits, dev)
    try:
        exp.net.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{checkpoint}: does not fit the recipe's network ({first})") from None
    target = {"test": splits.test, "val": splits.val, "train": splits.train}[split]
    if target is None:
        raise EprunError(f"{checkpoint}: the run has no validation split (data.val_size: 0)")
    result = evaluate(exp.rule, target, recipe.data.eval_batch_size)
    return {"accuracy": result["accuracy"], "loss": result["loss"], "split": split, "n": result["n"]}
