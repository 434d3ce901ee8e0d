"""The dense relaxation on each engine this machine can run, side by side in one process: torch,
and the compiled kernel built for each instruction set the CPU has (generic: the scalar loops a
machine without AVX2 runs; avx2; avx512), on one thread and split over the OpenMP workers.

    python -m benchmarks.engines [--case proto-mlp-1h] [--batches 50 1000] [--rounds 5]

The case's net (its recipe's initial weights) relaxes a free phase of the recipe's T steps from
s = 0 on random inputs of the dataset's shape, at each batch size; every engine in turn, for
``--rounds`` rounds, each figure the best round's µs per step and per example-step. The states
of every engine are compared with torch's (float32 rounding). Returns the figures.
"""

from __future__ import annotations

import argparse
import time

import torch


def _best(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="proto-mlp-1h")
    parser.add_argument("--batches", type=int, nargs="+", default=[50, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from benchmarks.variants import engine, threads_kept, variant
    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup
    from eprun.native import build

    setup = CaseSetup(CASES[args.case], BenchOptions(), torch.device("cpu"), torch.float32)
    net, rule, _ = setup.eprun_side()
    T = rule.cfg.T
    flags = build.cpu_flags()
    arches = [a for a in ("generic", "avx2", "avx512") if all(f in flags for f in build.ARCHES[a][1])]
    threads = sorted({1, torch.get_num_threads()})
    results: dict = {"case": args.case, "T": T, "net": net.describe(), "engines": {}}
    print(f"{args.case}: {net.describe()}, free phase T={T}; µs a step (ns an example-step), best of {args.rounds}")
    with threads_kept():
        for batch in args.batches:
            x, _ = setup.data(1, batch, "engines")[0]
            with torch.no_grad():
                drive = net.input_drive(x)
                with engine("0"):
                    reference = rule.free_phase(drive)
                for n in threads:
                    torch.set_num_threads(n)
                    runs = {"torch": None} | {arch: arch for arch in arches}
                    for name, arch in runs.items():
                        if arch is None:
                            with engine("0"):
                                seconds = _best(lambda: rule.free_phase(drive), args.rounds)
                                state = rule.free_phase(drive)
                        else:
                            with engine("auto"), variant(arch=arch):
                                seconds = _best(lambda: rule.free_phase(drive), args.rounds)
                                state = rule.free_phase(drive)
                                assert net.last_relax_engine == "native"
                        key = f"batch {batch}, {n} thread(s), {name}"
                        results["engines"][key] = {
                            "us_per_step": seconds / T * 1e6, "ns_per_example_step": seconds / T / batch * 1e9,
                            "max_abs_difference_from_torch": max(float((a - b).abs().max())
                                                                 for a, b in zip(state, reference))}
                        r = results["engines"][key]
                        print(f"  {key:36s} {r['us_per_step']:9.1f} µs ({r['ns_per_example_step']:7.1f} ns)   "
                              f"|Δ| {r['max_abs_difference_from_torch']:.1e}")
    return results


if __name__ == "__main__":
    main()
