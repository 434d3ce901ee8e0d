"""The conv net's nudged phase per example at several batch sizes: whether running the +β and −β
phases of the symmetric estimator as one batch of twice the size would pay.

    python -m benchmarks.conv_batch_scaling [--threads 2] [--batches 20 40 100 200] [--repeats 3]

For each batch size: random MNIST-shaped inputs, the ``ernoult2019/proto-conv`` net's initial
weights (as ``eprun bench``'s conv-mnist case builds them), a free phase, then the best of
``--repeats`` nudged phases (K=10, β=0.4) from it; prints milliseconds and microseconds per
example. The dense nets' compiled relaxation costs the same per example at any batch size, so
only the conv nets (torch path) could gain.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[20, 40, 100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup

    print(f"conv-mnist nudged phase (K=10), {torch.get_num_threads()} thread(s):")
    for batch in args.batches:
        setup = CaseSetup(CASES["conv-mnist"], BenchOptions(overrides=[f"data.batch_size={batch}"]),
                       torch.device("cpu"), torch.float32)
        net, rule, _ = setup.eprun_side()
        x, y = setup.data(1, batch, "scaling")[0]
        with torch.no_grad():
            drive, target = net.input_drive(x), net.target(y, x)
            free = rule.free_phase(drive)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                net.relax(drive, [s.clone() for s in free], 10, 0.4, target)
                best = min(best, time.perf_counter() - start)
        print(f"  batch {batch:4d}: {best * 1e3:7.1f} ms, {best / batch * 1e6:6.1f} µs per example")


if __name__ == "__main__":
    main()
