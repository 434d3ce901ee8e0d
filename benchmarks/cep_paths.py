"""C-EP's nudged phase on its two paths, side by side in one process: the input drive recomputed
and every weight stepped at every nudged step, against the drive followed through x̃x̃ᵀ with
W_0 and b_1 updated once (``rules/cep.py``, "Cost").

    python -m benchmarks.cep_paths [--case cep-mlp-1h] [--batches 30] [--rounds 5] [-s KEY=VALUE ...]

Both paths start from the case's initial weights and train on the same seeded random batches,
alternating rounds; each figure is the best round's training samples/s. Also printed: the
relative difference of the two paths' weight changes over one batch from the initial weights,
in float32 and in float64 (over many batches the float32 trajectories of either path part from
the float64 one as fast as from each other: rounding, amplified by training). Returns the figures.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="cep-mlp-1h")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup

    setup = CaseSetup(CASES[args.case], BenchOptions(overrides=list(args.overrides)), torch.device("cpu"),
                      torch.float32)
    pool = setup.data(args.batches, setup.batch, "cep-paths")
    sides = {}
    for name, follow in (("recomputed", False), ("followed", True)):
        net, rule, train = setup.eprun_side()
        if not follow:
            rule.follows_input_drive = lambda: False
        assert rule.follows_input_drive() is follow, f"{args.case}: the {name} path does not apply here"
        sides[name] = (net, train, [])
    for _ in range(args.rounds):
        for name, (net, train, times) in sides.items():
            begin = time.perf_counter()
            for x, y in pool:
                train(x, y)
            times.append(time.perf_counter() - begin)
    differences = {str(dtype).removeprefix("torch."): _one_batch_difference(setup, pool[0], dtype)
                   for dtype in (torch.float32, torch.float64)}
    samples = args.batches * setup.batch
    results = {"case": args.case, "threads": torch.get_num_threads(), "batch": setup.batch,
               "samples_per_s": {name: samples / min(times) for name, (_, _, times) in sides.items()},
               "relative_difference_of_one_update": differences}
    rates = results["samples_per_s"]
    print(f"{args.case} ({setup.pristine.describe()}, batch {setup.batch}, {results['threads']} thread(s), "
          f"best of {args.rounds} rounds of {args.batches} batches): recomputed {rates['recomputed']:,.0f}, "
          f"followed {rates['followed']:,.0f} samples/s ({rates['followed'] / rates['recomputed']:.2f}×); "
          f"one batch's updates differ by {differences['float32']:.1e} in float32, "
          f"{differences['float64']:.1e} in float64 (relative)")
    return results


def _one_batch_difference(setup, batch, dtype) -> float:
    """‖Δθ_followed − Δθ_recomputed‖ / ‖Δθ_recomputed‖ over one training step from the initial weights."""
    x, y = batch
    moved = []
    for follow in (True, False):
        net, rule, train = setup.eprun_side(dtype)
        if not follow:
            rule.follows_input_drive = lambda: False
        start = [p.detach().clone() for p in net.parameters()]
        train(x.to(dtype), y)
        moved.append([p.detach() - s for p, s in zip(net.parameters(), start)])
    difference = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(*moved)))
    return difference / math.sqrt(sum(float((b ** 2).sum()) for b in moved[1]))


if __name__ == "__main__":
    main()
