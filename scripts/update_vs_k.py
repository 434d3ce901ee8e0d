"""The size of EP's update against the phases' lengths, at a run's last weights: how far the
nudged phase has converged after K steps.

    python scripts/update_vs_k.py RUN_DIR [--pairs 30:10 40:15 300:300] [--batches 10] [--data data]

For each T:K pair, the run's recipe with that T and K computes EP's update (what the rule writes
into ``.grad``) on the first ``--batches`` training batches of MNIST (IDX files in ``--data``)
from the weights of the run's last checkpoint; printed: the mean norm of the update and the
mean cosine between each pair's update and the last pair's (taken as the converged one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from eprun.assemble import build_network, build_rule
from eprun.data.idx import read_idx
from eprun.recipe import from_plain


def updates(base: dict, weights: dict, T: int, K: int, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    data = yaml.safe_load(yaml.safe_dump(base))
    data["rule"]["T"], data["rule"]["K"] = T, K
    recipe = from_plain(data)
    net = build_network(recipe, tuple(x.shape[1:]), 10, torch.device("cpu"))
    net.load_state_dict(weights)
    rule = build_rule(recipe, net)
    out = []
    for start in range(0, len(x), batch):
        net.zero_grad(set_to_none=False)
        rule.train_step(x[start:start + batch], y[start:start + batch])
        out.append(torch.cat([p.grad.flatten() for p in net.parameters()]).clone())
    return torch.stack(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["30:10", "40:15", "300:300"])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--data", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    base = yaml.safe_load((args.run / "recipe.yaml").read_text())
    weights = torch.load(args.run / "checkpoints" / "last.pt", weights_only=True)["model"]
    batch = base["data"]["batch_size"]
    n = args.batches * batch
    x = read_idx(args.data / "train-images-idx3-ubyte.gz")[:n].float().div(255).view(n, 1, 28, 28)
    y = read_idx(args.data / "train-labels-idx1-ubyte.gz")[:n].long()
    pairs = [tuple(int(v) for v in p.split(":")) for p in args.pairs]
    found = {p: updates(base, weights, *p, x, y, batch) for p in pairs}
    last = found[pairs[-1]]
    results = {}
    for (T, K), u in found.items():
        cosine = float(torch.nn.functional.cosine_similarity(u, last, dim=1).mean())
        results[f"T={T} K={K}"] = {"mean_norm": float(u.norm(dim=1).mean()), "cosine_to_last": cosine}
        print(f"T={T:4d} K={K:4d}: mean |update| {results[f'T={T} K={K}']['mean_norm']:.4f}, "
              f"cosine to T={pairs[-1][0]} K={pairs[-1][1]}: {cosine:.3f}")
    return results


if __name__ == "__main__":
    main()
