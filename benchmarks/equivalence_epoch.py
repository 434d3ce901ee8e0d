"""One epoch of 784-512-10 EP on MNIST with eprun's closed-form step and with the autograd-of-Φ
baseline, from the same initial weights, the same data order and the same Adam settings.

    python -m benchmarks.equivalence_epoch [--seed 0] [--val-size 0]

Prints both test accuracies and throughputs: the two formulations compute the same update, so
they should end at (nearly) the same accuracy, and any gap to a published single-run figure is
seed variation, not a difference in the algorithm.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from eprun.reference.autograd_ep import ep_train_step, predict
from eprun.assemble import generator
from eprun.data import load_splits
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.rules.ep import EP, EPConfig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=None)
    args = parser.parse_args()
    T, K, beta, bs = 30, 10, 0.1, 50

    splits = load_splits("mnist", root=None, val_size=args.val_size, split_seed=args.seed)
    net_fast = PrototypicalMLP(MLPConfig(hidden=[512]), (1, 28, 28), 10, generator(args.seed, "init"))
    net_base = copy.deepcopy(net_fast)
    rule = EP(EPConfig(T=T, K=K, beta=beta), net_fast, torch.Generator())
    opt_fast = torch.optim.Adam(net_fast.parameters(), lr=5e-4)
    opt_base = torch.optim.Adam(net_base.parameters(), lr=5e-4)
    order = torch.randperm(len(splits.train), generator=generator(args.seed, "shuffle"))
    n_batches = len(order) // bs if args.max_batches is None else args.max_batches
    result = {}
    for name, step in (("eprun", lambda x, y: (opt_fast.zero_grad(), rule.train_step(x, y), opt_fast.step())),
                       ("autograd", lambda x, y: (ep_train_step(net_base, x, y, T, K, beta), opt_base.step()))):
        start = time.perf_counter()
        for b in range(n_batches):
            idx = order[b * bs:(b + 1) * bs]
            step(splits.train.x[idx], splits.train.y[idx])
        elapsed = time.perf_counter() - start
        result[f"{name}_samples_per_s"] = n_batches * bs / elapsed
    with torch.no_grad():
        pred_fast = torch.cat([rule.evaluate(splits.test.x[i:i + 1000], splits.test.y[i:i + 1000])[0]
                               for i in range(0, len(splits.test), 1000)]).argmax(1)
    pred_base = torch.cat([predict(net_base, splits.test.x[i:i + 1000], T)
                           for i in range(0, len(splits.test), 1000)]).argmax(1)
    result["eprun_test_accuracy"] = (pred_fast == splits.test.y).float().mean().item()
    result["autograd_test_accuracy"] = (pred_base == splits.test.y).float().mean().item()
    result["max_weight_difference"] = max((a - b).abs().max().item()
                                          for a, b in zip(net_fast.parameters(), net_base.parameters()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
