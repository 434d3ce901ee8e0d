"""The compiled relaxation of a deeper net in blocks of examples against the same kernel in pairs,
side by side in one process: the free phase of a bench case's net at its recipe's batch and T.

    python -m benchmarks.block_path [--case proto-mlp-3h] [-s model.hidden=[512,512]] [--threads N] [--rounds 4]

Rounds alternate the two paths (the pairs path is a build with ``EPRUN_NO_BLOCKS``); each figure
is one round's best of 3 calls (ms a phase, µs a step). Returns them, and the largest difference
of the free states between the paths.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="proto-mlp-3h")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("-s", "--set", action="append", default=[], help="an override of the case's recipe")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from benchmarks.variants import variant
    from eprun import native
    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup

    setup = CaseSetup(CASES[args.case], BenchOptions(overrides=args.set), torch.device("cpu"), torch.float32)
    net, rule, _ = setup.eprun_side()
    batch = setup.recipe.data.batch_size
    x, _ = setup.data(1, batch, "block path")[0]
    T = rule.cfg.T
    if not native.status()["vectorized"]:
        raise SystemExit("the kernel has no block path here (it needs an AVX2 or AVX-512 build)")
    print(f"{args.case}: {'-'.join(map(str, net.sizes))}, batch {batch}, T={T}, {torch.get_num_threads()} thread(s)")
    paths = {"pairs": ("EPRUN_NO_BLOCKS",), "blocks": ()}
    results = {name: {"ms_per_phase": [], "us_per_step": []} for name in paths}
    states = {}
    with torch.no_grad():
        drive = net.input_drive(x)
        for r in range(args.rounds):
            for name, defines in paths.items():
                with variant(*defines):
                    states[name] = rule.free_phase(drive)
                    assert net.last_relax_engine == "native"
                    best = float("inf")
                    for _ in range(3):
                        start = time.perf_counter()
                        rule.free_phase(drive)
                        best = min(best, time.perf_counter() - start)
                results[name]["ms_per_phase"].append(best * 1e3)
                results[name]["us_per_step"].append(best / T * 1e6)
                print(f"  round {r + 1} {name:6s} {best * 1e3:8.2f} ms  {best / T * 1e6:7.1f} µs a step")
    gap = max(float((a - b).abs().max()) for a, b in zip(states["pairs"], states["blocks"]))
    print(f"largest difference of the free states between the paths: {gap:.1e}")
    results["max_abs_difference"] = gap
    return results


if __name__ == "__main__":
    main()
