"""The compiled relaxation of a deeper net in blocks of examples against the same kernel in pairs,
side by side in one process: the free phase of a bench case's net at its recipe's batch and T.

    python -m benchmarks.block_path [--case proto-mlp-3h] [--threads N] [--rounds 4]

Rounds alternate the two paths; each figure is one round's best of 3 calls (ms a phase, µs a step).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="proto-mlp-3h")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from eprun import native
    from eprun.bench import CASES, BenchOptions, _Setup

    setup = _Setup(CASES[args.case], BenchOptions(), torch.device("cpu"), torch.float32)
    net, rule, _ = setup.eprun_side()
    batch = setup.recipe.data.batch_size
    x, _ = setup.data(1, batch, "block path")[0]
    T = rule.cfg.T
    if not native.status()["avx512"]:
        raise SystemExit("the kernel has no block path here (it needs an AVX-512 build)")
    print(f"{args.case}: {'-'.join(map(str, net.sizes))}, batch {batch}, T={T}, {torch.get_num_threads()} thread(s)")
    previous = native.use_block_path()
    try:
        with torch.no_grad():
            drive = net.input_drive(x)
            states = {}
            for r in range(args.rounds):
                for name, on in (("pairs", False), ("blocks", True)):
                    native.use_block_path(on)
                    states[name] = rule.free_phase(drive)
                    assert net.last_relax_engine == "native"
                    best = float("inf")
                    for _ in range(3):
                        start = time.perf_counter()
                        rule.free_phase(drive)
                        best = min(best, time.perf_counter() - start)
                    print(f"  round {r + 1} {name:6s} {best * 1e3:8.2f} ms  {best / T * 1e6:7.1f} µs a step")
    finally:
        native.use_block_path(previous)
    gap = max(float((a - b).abs().max()) for a, b in zip(states["pairs"], states["blocks"]))
    print(f"largest difference of the free states between the paths: {gap:.1e}")


if __name__ == "__main__":
    main()
