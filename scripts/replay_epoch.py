"""Replay the epoch after a checkpoint of an EP run, batch by batch, exactly as the run trained it,
printing what each batch's update looked like: to find the batch where a run went wrong.

    python scripts/replay_epoch.py RUN_DIR [--checkpoint best|last] [--every 100] [--norm 5] [--stop-loss 0.2]
                                   [--end-points]

The run's recipe, data split and checkpoint are restored as ``eprun train --resume`` restores them
(same shuffling, same draws), so the batches are the run's own. For every ``--every``-th batch, and
every batch whose update norm exceeds ``--norm``: the mean loss, ‖update‖ (all of ``.grad``), and
how settled the phases are — the free phase's one-step change max|F(s*) − s*| and, from the end of
a nudged phase, the largest change over one and over two further nudged steps (a period-2 cycle
shows as a large one-step and a small two-step change); with ``--end-points``, for a net whose EP
update sums the nudged steps (``accumulates_nudged_steps``), also the norm of the end-point update
on the same batch and weights. Stops after the first batch whose mean loss exceeds
``--stop-loss``. Single thread, CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def largest_change(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def grad_norm(net) -> float:
    return sum(float(p.grad.norm()) ** 2 for p in net.parameters() if p.grad is not None) ** 0.5


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--checkpoint", choices=["best", "last"], default="best")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--norm", type=float, default=5.0)
    parser.add_argument("--stop-loss", type=float, default=0.2)
    parser.add_argument("--end-points", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from eprun import runner, runs
    from eprun.data.augment import augment
    from eprun.recipe import load_recipe

    recipe = load_recipe(args.run / runs.RECIPE_FILE)
    device = torch.device("cpu")
    splits = runner.load_data(recipe, device)
    exp = runner.assemble(recipe, splits, device)
    checkpoint = args.run / (runs.BEST_CHECKPOINT if args.checkpoint == "best" else runs.LAST_CHECKPOINT)
    pos = runner.restore(exp, runs.load_checkpoint(checkpoint), runner.Window(device), runner.Window(device),
                         str(checkpoint))
    print(f"restored {checkpoint}: epoch {pos.epoch} (0-based), batch {pos.batch}, step {pos.step}")
    if pos.batch:
        exp.shuffle.set_state(pos.epoch_shuffle_state)
    order = torch.randperm(len(splits.train), generator=exp.shuffle)
    net, rule, relaxation = exp.net, exp.rule, recipe.rule.relaxation()
    bs = recipe.data.batch_size
    for b in range(pos.batch, runner.batches_per_epoch(recipe, len(splits.train))):
        idx = order[b * bs:(b + 1) * bs]
        x, y = augment(splits.train.x[idx], recipe.data.augment, exp.augment), splits.train.y[idx]
        rule.prepare_batch()
        exp.optimizer.zero_grad(set_to_none=False)
        _, loss = rule.train_step(x, y)
        norm = grad_norm(net)
        mean_loss = float(loss.mean())
        if b % args.every == 0 or norm > args.norm or mean_loss > args.stop_loss:
            with torch.no_grad():
                drive, target = net.input_drive(x), net.target(y, x)
                free = rule.free_phase(drive)
                settled = largest_change(net.relax(drive, [s.clone() for s in free], 1), free)
                nudged = net.relax(drive, [s.clone() for s in free], relaxation.K, relaxation.beta, target)
                one = net.relax(drive, [s.clone() for s in nudged], 1, relaxation.beta, target)
                two = net.relax(drive, [s.clone() for s in one], 1, relaxation.beta, target)
            other = ""
            if args.end_points and net.accumulates_nudged_steps:
                update = [p.grad.clone() for p in net.parameters()]
                net.accumulates_nudged_steps = False
                exp.optimizer.zero_grad(set_to_none=False)
                rule.train_step(x, y)
                other = f", end-point update norm {grad_norm(net):.3f}"
                net.accumulates_nudged_steps = True
                for p, g in zip(net.parameters(), update):
                    p.grad.copy_(g)
            print(f"batch {b}: loss {mean_loss:.4f}, update norm {norm:.3f}{other}, free one-step change "
                  f"{settled:.2e}, nudged one-step change {largest_change(one, nudged):.2e}, two-step change "
                  f"{largest_change(two, nudged):.2e} {net.monitor()}")
            if mean_loss > args.stop_loss:
                break
        if not rule.steps_optimizer:
            exp.optimizer.step()


if __name__ == "__main__":
    main()
