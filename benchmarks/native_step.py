"""The compiled relaxation's cost per example-step, for several builds of the kernel side by side.

    python -m benchmarks.native_step [SOURCE[:MACRO[=VALUE]…] …] [--steps 300] [--rounds 15]

Each SOURCE (default: eprun/native/dense_relax.c) is compiled as eprun builds it (-O3
-march=native -fopenmp) with ``EPRUN_EVERY_STEP`` (no stop at a bitwise fixed point) and the
given macros, into a temporary library; the libraries then run, in turns, ``--rounds`` times each,
a free phase of ``--steps`` fixed steps of the 784-512-10 net at batch 50 on one thread, random
weights and drive. Prints the best round's nanoseconds per example-step and the largest
difference of each build's states from the first build's after 30 steps, and returns them by
source. Every source must export ``eprun_relax_dense`` with this version's arguments.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from eprun.native import build as native_build

P = ctypes.c_void_p
ARGTYPES = [ctypes.c_int, P, P, P, P, P, P, ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_float, P,
            ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, P, ctypes.c_int64, ctypes.c_int]


def build(spec: str, directory: Path, index: int) -> ctypes.CDLL:
    source, *macros = spec.split(":")
    target = directory / f"build{index}.so"
    subprocess.run([native_build.compiler() or "cc", "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
                    "-DEPRUN_EVERY_STEP", *[f"-D{m}" for m in macros], "-o", str(target), source, "-lm"], check=True)
    library = ctypes.CDLL(str(target))
    library.eprun_relax_dense.argtypes = ARGTYPES
    return library


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", default=[str(native_build.SOURCES[0])])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    batch, n0, n1 = 50, 512, 10
    w1 = (torch.rand(n1, n0, generator=g) - 0.5) * 0.2
    drive, c1 = torch.randn(batch, n0, generator=g), torch.zeros(n1)

    def run(library, steps):
        state = [torch.zeros(batch, n0), torch.zeros(batch, n1)]
        start = time.perf_counter()
        code = library.eprun_relax_dense(
            2, (ctypes.c_int64 * 2)(n0, n1), (P * 2)(*[s.data_ptr() for s in state]),
            (P * 2)(drive.data_ptr(), c1.data_ptr()), (ctypes.c_int * 2)(1, 0), (P * 2)(None, w1.data_ptr()),
            (P * 2)(w1.data_ptr(), None), 1.0, 0, 0.0, 0.0, None, steps, 0, 0.0, 1, None, batch, 1)
        assert code == 0
        return time.perf_counter() - start, state

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        libraries = [(spec, build(spec, Path(tmp), i)) for i, spec in enumerate(args.sources)]
        best = {spec: float("inf") for spec, _ in libraries}
        for _ in range(args.rounds):
            for spec, library in libraries:
                best[spec] = min(best[spec], run(library, args.steps)[0])
        reference = None
        for spec, library in libraries:
            state = run(library, 30)[1]
            reference = reference or state
            diff = max(float((a - b).abs().max()) for a, b in zip(state, reference))
            results[spec] = {"ns_per_example_step": best[spec] / args.steps / batch * 1e9, "max_abs_difference": diff}
            print(f"{results[spec]['ns_per_example_step']:8.1f} ns per example-step   max |Δ| {diff:.1e}   {spec}")
    return results


if __name__ == "__main__":
    main()
