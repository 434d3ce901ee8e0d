"""Replay the epoch after a checkpoint of a target-propagation run (rules dtp, drl, vanilla_dtp,
tp), batch by batch, exactly as the run trained it, and print per layer what each batch did: to
find where and how a run diverged.

    python scripts/replay_dtp_epoch.py RUN_DIR [--checkpoint best|last|none] [--every 50] [--tail 40]
                                       [--epochs 1] [--batches N] [-s KEY=VALUE ...]

The run's recipe, data split and checkpoint are restored as ``eprun train --resume`` restores them
(same shuffling, same augmentation and noise draws), so the batches are the run's own; ``-s`` overrides recipe keys
(e.g. ``-s optim.weight_decay=1e-4``, ``-s rule.feedback_lr=[0.004,0.1]``) to replay the same
batches under other settings (they hold over the optimiser settings stored in the checkpoint);
``--checkpoint none`` starts from the run's initial weights (its recipe and seed) and ``--epochs``
goes on for more epochs, reshuffled as the run reshuffles them. One line
per ``--every``-th batch, and the last ``--tail`` batches before the first non-finite loss:

* ``loss``, ``|h_N|``: the batch's mean loss and the logits' root-mean-square norm per example;
* per layer l: ``|W_l|`` (forward weights), ``|G_l|`` (feedback weights), ``L_G`` (G_l's last
  feedback loss), ``|t-h|`` (‖t_l − h_l‖ per example, root mean square), ``|dW|`` (‖∂L_l/∂θ_l‖).

Single thread, CPU.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch


def rms_norm(t: torch.Tensor) -> float:
    """Root mean square over the batch of the per-example norm."""
    return float(t.flatten(1).pow(2).sum(dim=1).mean().sqrt())


def group_norm(params) -> float:
    return sum(float(p.detach().norm()) ** 2 for p in params) ** 0.5


def grad_norm(params) -> float:
    return sum(float(p.grad.norm()) ** 2 for p in params if p.grad is not None) ** 0.5


def hyperparameters(optimizer) -> list[dict]:
    """Each parameter group's settings (lr, momentum, weight decay, …), without its parameters."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def set_hyperparameters(optimizer, settings: list[dict]) -> None:
    """Loading a checkpoint's optimiser state restores the run's settings: put the recipe's back.
    Under a schedule the rate keeps its place in it: lr = restored lr · new initial_lr / restored one."""
    for group, values in zip(optimizer.param_groups, settings):
        values = dict(values)
        if "initial_lr" in values and group.get("initial_lr"):
            values["lr"] = group["lr"] * values["initial_lr"] / group["initial_lr"]
        group.update(values)


def main(argv=None):
    """Replay; return the experiment as it stands after the last batch replayed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", choices=["best", "last", "none"], default="last")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--tail", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=0, help="stop after this many batches (0: the epochs)")
    parser.add_argument("-s", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from eprun import runner, runs
    from eprun.data.augment import augment
    from eprun.recipe import load_recipe
    from eprun.rules.dtp import DTP

    recipe = load_recipe(args.run / runs.RECIPE_FILE, overrides=args.set)
    device = torch.device("cpu")
    splits = runner.load_data(recipe, device)
    exp = runner.assemble(recipe, splits, device)
    if not isinstance(exp.rule, DTP):
        parser.error(f"{args.run}: rule.kind is {recipe.rule.kind}; this script replays target propagation runs "
                     f"(dtp, drl, vanilla_dtp, tp); for EP runs use scripts/replay_epoch.py")
    if args.checkpoint == "none":
        pos = runner.Position()
        print(f"from the initial weights of {args.run}" + (f"; overrides {args.set}" if args.set else ""))
    else:
        checkpoint = args.run / (runs.BEST_CHECKPOINT if args.checkpoint == "best" else runs.LAST_CHECKPOINT)
        optimizers = [exp.optimizer, *exp.rule.feedback_optimizers]
        settings = [hyperparameters(opt) for opt in optimizers]
        pos = runner.restore(exp, runs.load_checkpoint(checkpoint), runner.Window(device), runner.Window(device),
                             str(checkpoint))
        if args.set:  # the overrides hold over the checkpoint's settings
            for opt, values in zip(optimizers, settings):
                set_hyperparameters(opt, values)
            if exp.scheduler is not None:
                exp.scheduler.base_lrs = [group["initial_lr"] for group in exp.optimizer.param_groups]
        print(f"restored {checkpoint}: epoch {pos.epoch} (0-based), batch {pos.batch}, step {pos.step}"
              + (f"; overrides {args.set}" if args.set else ""))
        if pos.batch:
            exp.shuffle.set_state(pos.epoch_shuffle_state)
    net, rule = exp.net, exp.rule
    forward, feedback = net.layer_groups(), net.feedback_groups()
    bs = recipe.data.batch_size
    tail: collections.deque[str] = collections.deque(maxlen=args.tail)
    n_batches = runner.batches_per_epoch(recipe, len(splits.train))
    done = 0
    for epoch in range(pos.epoch, pos.epoch + args.epochs):
        order = torch.randperm(len(splits.train), generator=exp.shuffle)
        for b in range(pos.batch if epoch == pos.epoch else 0, n_batches):
            if args.batches and done == args.batches:
                break
            done += 1
            idx = order[b * bs:(b + 1) * bs]
            x, y = augment(splits.train.x[idx], recipe.data.augment, exp.augment), splits.train.y[idx]
            rule.prepare_batch()
            exp.optimizer.zero_grad(set_to_none=False)
            logits, loss = rule.train_step(x, y)
            with torch.no_grad():
                hs, indices = net.forward_all(x)
                t = rule.targets(hs, indices, y)
            parts = [f"epoch {epoch + 1} batch {b}: loss {float(loss.mean()):.4f} |h_N| {rms_norm(logits):.2f}"]
            for l in range(1, net.depth + 1):
                g = (f" |G| {group_norm(feedback[l - 2]):.2f} L_G {float(rule.last_feedback_loss[l]):.3g}"
                     if l > 1 else "")
                parts.append(f"L{l}: |W| {group_norm(forward[l - 1]):.2f}{g} |t-h| {rms_norm(t[l] - hs[l]):.3g} "
                             f"|dW| {grad_norm(forward[l - 1]):.3g}")
            line = " | ".join(parts)
            finite = bool(torch.isfinite(loss).all()) and all(
                p.grad is None or bool(torch.isfinite(p.grad).all()) for p in net.parameters())
            tail.append(line)
            if not finite:
                print(f"--- the last {len(tail)} batches, the first non-finite one last:")
                print("\n".join(tail))
                return exp
            if b % args.every == 0:
                print(line, flush=True)
            exp.optimizer.step()
        if exp.scheduler is not None:
            exp.scheduler.step()
    print(f"--- {done} batches without a non-finite loss; the last {len(tail)}:")
    print("\n".join(tail))
    return exp


if __name__ == "__main__":
    main()
