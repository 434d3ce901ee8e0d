"""Training throughput of the 784-512-10 prototypical EP net: eprun's closed-form step against
the autograd-of-Φ baseline (benchmarks/autograd_ep.py), side by side in one process.

    python -m benchmarks.bench_mlp [--batches 40] [--hidden 512] [--T 30 --K 10 --batch 50]

Both include the Adam step. Prints samples/s of each and the ratio; also checks that the two
produce the same update on the same batch. ``eprun bench`` runs this comparison for every net
and rule with a baseline (``eprun bench --only proto-mlp-1h`` is this one).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.autograd_ep import autograd_train_step
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.optim import build_optimizer
from eprun.recipe import OptimConfig
from eprun.rules.ep import EP, EPConfig


def timed(step, batches: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512])
    parser.add_argument("--T", type=int, default=30)
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    net = PrototypicalMLP(MLPConfig(hidden=args.hidden), (1, 28, 28), 10, torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=args.T, K=args.K, beta=args.beta), net, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    # same update from both formulations
    net.zero_grad(set_to_none=False)
    rule.train_step(x, y)
    ours = [p.grad.clone() for p in net.parameters()]
    autograd_train_step(net, x, y, args.T, args.K, args.beta)
    max_rel = max(float((a - b).norm() / b.norm()) for a, b in zip(ours, (p.grad for p in net.parameters())))

    opt_fast = build_optimizer(OptimConfig(lr=5e-4), net.layer_groups())
    opt_base = torch.optim.Adam(net.parameters(), lr=5e-4)

    def fast_step():
        opt_fast.zero_grad(set_to_none=False)
        rule.train_step(x, y)
        opt_fast.step()

    def base_step():
        autograd_train_step(net, x, y, args.T, args.K, args.beta)
        opt_base.step()

    t_base = timed(base_step, args.batches)
    t_fast = timed(fast_step, args.batches)
    result = {
        "net": "784-" + "-".join(map(str, args.hidden)) + "-10", "T": args.T, "K": args.K, "batch": args.batch,
        "threads": torch.get_num_threads(),
        "autograd_samples_per_s": args.batches * args.batch / t_base,
        "eprun_samples_per_s": args.batches * args.batch / t_fast,
        "ratio": t_base / t_fast,
        "max_relative_update_difference": max_rel,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v:,.4g}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    main()
