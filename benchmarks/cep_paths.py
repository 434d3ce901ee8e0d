"""C-EP's nudged phase on its paths, side by side in one process (``rules/cep.py``, "Cost"):

* ``recomputed``: the input drive recomputed and every weight stepped at every nudged step;
* ``input followed``: the drive followed through x̃x̃ᵀ, W_0 and b_1 updated once, the other
  weights stepped at every nudged step (the vector-field nets' path);
* ``engine``: the net's own nudged phase (``continual_nudged_phase_``): on the prototypical net
  every weight held as θ* plus its increments in factored form and written once
  (``eprun/nets/dense_cep.py``), on the vector-field net every weight stepped in place in the
  layout its product reads (``eprun/nets/vf_cep.py``).

    python -m benchmarks.cep_paths [--case cep-mlp-1h] [--batches 30] [--rounds 5] [-s KEY=VALUE ...]

Every path starts from the case's initial weights and trains on the same seeded random batches,
alternating rounds; each figure is the best round's training samples/s. Also printed: the
relative difference of each faster path's weight change from the recomputed one's over one
batch from the initial weights, in float32 and in float64 (over many batches the float32
trajectories of any two paths part from the float64 one as fast as from each other: rounding,
amplified by training). A path that does not apply to the case's net is left out. Returns the figures.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from eprun.nets.base import EPNetwork


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
    for name in PATHS:
        net, rule, train = setup.eprun_side()
        if _choose(name, net, rule):
            sides[name] = (net, train, [])
    assert "recomputed" in sides and len(sides) > 1, f"{args.case}: no faster C-EP path applies here"
    for _ in range(args.rounds):
        for name, (net, train, times) in sides.items():
            begin = time.perf_counter()
            for x, y in pool:
                train(x, y)
            times.append(time.perf_counter() - begin)
    differences = {name: {str(dtype).removeprefix("torch."): _one_batch_difference(setup, pool[0], dtype, name)
                          for dtype in (torch.float32, torch.float64)}
                   for name in sides if name != "recomputed"}
    samples = args.batches * setup.batch
    results = {"case": args.case, "threads": torch.get_num_threads(), "batch": setup.batch,
               "samples_per_s": {name: samples / min(times) for name, (_, _, times) in sides.items()},
               "relative_difference_of_one_update": differences}
    rates = results["samples_per_s"]
    print(f"{args.case} ({setup.pristine.describe()}, batch {setup.batch}, {results['threads']} thread(s), "
          f"best of {args.rounds} rounds of {args.batches} batches), samples/s:")
    for name, rate in rates.items():
        line = f"  {name:>15}: {rate:,.0f} ({rate / rates['recomputed']:.2f}×)"
        if name in differences:
            d = differences[name]
            line += f"; one batch's update differs by {d['float32']:.1e} (float32), {d['float64']:.1e} (float64)"
        print(line)
    return results


PATHS = ("recomputed", "input followed", "engine")


def _choose(name: str, net, rule) -> bool:
    """Make ``rule`` take path ``name``; False where that path does not apply to the net."""
    if not rule.follows_input_drive():
        return name == "recomputed"
    if name == "recomputed":
        rule.follows_input_drive = lambda: False
    elif name == "input followed":
        net.continual_nudged_phase_ = lambda *args: False
    elif type(net).continual_nudged_phase_ is EPNetwork.continual_nudged_phase_:
        return False  # the net offers no nudged phase of its own
    return True


def _one_batch_difference(setup, batch, dtype, name: str) -> float:
    """‖Δθ_path − Δθ_recomputed‖ / ‖Δθ_recomputed‖ over one training step from the initial weights."""
    x, y = batch
    moved = []
    for path in (name, "recomputed"):
        net, rule, train = setup.eprun_side(dtype)
        _choose(path, net, rule)
        start = [p.detach().clone() for p in net.parameters()]
        train(x.to(dtype), y)
        moved.append([p.detach() - s for p, s in zip(net.parameters(), start)])
    difference = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(*moved)))
    return difference / math.sqrt(sum(float((b ** 2).sum()) for b in moved[1]))


if __name__ == "__main__":
    main()
