"""Training throughput of the conv net (``ernoult2019/proto-conv``) with the fixed schedule and with
early stopping at a tolerance, batch-wide and per example, from the same initial weights over the
same MNIST batches; then how far a fixed-T free phase is from a bitwise fixed point in float32.

    python -m benchmarks.conv_schedules [--threads 1] [--tol 1e-4]
        [--warmup 20] [--batches 60]
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from eprun.catalog import resolve
    from eprun.recipe import load_recipe
    from eprun.runner import assemble, load_data

    path = resolve("ernoult2019/proto-conv")
    schedules = {"fixed T and K": [], f"tol {args.tol:g}, batch-wide": [f"rule.tol={args.tol}"],
                 f"tol {args.tol:g}, per example": [f"rule.tol={args.tol}", "rule.tol_scope=example"]}
    print(f"ernoult2019/proto-conv, {args.threads} thread(s); batches 1–{args.warmup} warm-up, "
          f"{args.warmup + 1}–{args.warmup + args.batches} timed")
    for name, overrides in schedules.items():
        recipe = load_recipe(path, overrides)
        splits = load_data(recipe, torch.device("cpu"))
        exp = assemble(recipe, splits, torch.device("cpu"))  # the same seed: the same initial weights
        size = recipe.data.batch_size

        def step(i: int) -> None:
            x, y = splits.train.x[i * size:(i + 1) * size], splits.train.y[i * size:(i + 1) * size]
            exp.optimizer.zero_grad(set_to_none=False)
            exp.rule.train_step(x, y)
            exp.optimizer.step()

        for i in range(args.warmup):
            step(i)
        exp.rule.log_stats()
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.batches):
            step(i)
        seconds = time.perf_counter() - start
        steps = ", ".join(f"{k} {v:.1f}" for k, v in exp.rule.log_stats().items())
        print(f"  {name:28s} {args.batches * size / seconds:7.1f} samples/s  {steps}")

    # the last net: largest change per step of a fixed free phase, by step
    net = exp.net
    with torch.no_grad():
        x = splits.train.x[:size]
        drive = net.input_drive(x)
        state = net.init_state(size, like=drive)
        print("\nfree phase at these weights, largest |s_{t+1} − s_t| over the batch (float32):")
        for t in range(1, 201):
            before = [s.clone() for s in state]
            net.relax(drive, state, 1)
            if t % 25 == 0:
                change = max(float((a - b).abs().max()) for a, b in zip(state, before))
                print(f"  step {t:3d}: {change:.2e}")


if __name__ == "__main__":
    main()
