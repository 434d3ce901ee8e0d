"""One relaxation step of the MNIST conv net, with and without the compiled kernels, and where
the step's time goes, side by side in one process.

    python -m benchmarks.conv_step [--threads 2] [--batch 100] [--steps 40] [--rounds 5]

The ``ernoult2019/proto-conv`` net's initial weights and random inputs (as ``eprun bench``'s
conv-mnist case builds them), relaxed 50 steps first. Then, alternating ``--rounds`` times,
``relax`` for ``--steps`` steps with the compiled kernels (``EPRUN_NATIVE`` auto: the Winograd
convolution with its pooling and the top-down term) and on the torch path (``EPRUN_NATIVE=0``);
the best round of each, in ms a step. Then the parts of one step, each called in the order a
step calls them (100 steps, ms a call): the convolution z₁ = W₁ ⋆ s¹ (NCHW and channels-last),
the max pooling with indices, both at once by the compiled Winograd kernel, the top-down term
into s¹ (torch's ``max_unpool2d`` + ``conv_transpose2d`` + the drive and σ, and the compiled,
fused kernel).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def _per_step(net, drive, state, steps: int) -> float:
    start = time.perf_counter()
    net.relax(drive, state, steps)
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from eprun import native
    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup
    from eprun.nets import winograd
    from eprun.nets.pooling import max_pool_with_indices

    setup = CaseSetup(CASES["conv-mnist"], BenchOptions(), torch.device("cpu"), torch.float32)
    net = setup.pristine
    x, _ = setup.data(1, args.batch, "train")[0]
    with torch.no_grad():
        drive = net.input_drive(x)
        state = net.init_state(args.batch, x)
        net.relax(drive, state, 50)
        best = {"compiled": float("inf"), "torch": float("inf")}
        for _ in range(args.rounds):
            for name, flag in (("compiled", "auto"), ("torch", "0")):
                os.environ["EPRUN_NATIVE"] = flag
                native.reset()
                trial = [s.clone() for s in state]
                net.relax(drive, trial, 2)  # warm-up: buffers, oneDNN primitives
                best[name] = min(best[name], _per_step(net, drive, trial, args.steps))
        os.environ.pop("EPRUN_NATIVE")
        native.reset()
        print(f"batch {args.batch}, {args.threads} thread(s); relax, ms a step (best of {args.rounds}): "
              f"compiled kernels {best['compiled']:.3f}, torch {best['torch']:.3f}, "
              f"ratio {best['torch'] / best['compiled']:.2f}")

        a = net.act.scale
        s1, s2 = state[0], state[1]
        s1_last = s1.contiguous(memory_format=torch.channels_last)
        w = net.weights[1].detach()
        weight_r = w.permute(2, 0, 3, 1).contiguous()
        drive_last = drive.contiguous(memory_format=torch.channels_last)
        out = torch.empty_like(s1_last)
        z_size, size = tuple(net.conv_hw[1]), tuple(s1.shape[2:])
        _, indices = max_pool_with_indices(F.conv2d(s1_last, w), net.pool_size, True)
        compiled = native.conv.unpool_conv_t_available(w.shape[2], 1, net.paddings[1], z_size[1], size[1], s1.shape[1])
        fast_conv = native.conv.winograd_conv_pool_available(w.shape[2], 1, net.pool_size, z_size, w.shape[1], w.shape[0])
        weight_u = winograd.transform_weights(w)
        pooled_out = torch.empty(s2.shape, memory_format=torch.channels_last)
        indices_out = torch.empty(s2.shape, dtype=torch.int64, memory_format=torch.channels_last)

        def torch_term():
            u = F.max_unpool2d(s2, indices.contiguous(), net.pool_size, net.pool_size, output_size=z_size)
            torch.add(drive, F.conv_transpose2d(u, w), alpha=a, out=s1.new_empty(s1.shape)).clamp_(0.0, 1.0)

        def compiled_term():
            native.conv.unpool_conv_t(s2, indices, weight_r, z_size, size, net.paddings[1], out.permute(0, 2, 3, 1),
                                 drive_last.permute(0, 2, 3, 1), a, True)

        parts = {"z = W ⋆ s¹, NCHW": lambda: F.conv2d(s1, w),
                 "z = W ⋆ s¹, channels-last": lambda: F.conv2d(s1_last, w),
                 "max pool with indices (channels-last z)": lambda: max_pool_with_indices(F.conv2d(s1_last, w),
                                                                                          net.pool_size, True),
                 "top-down into s¹, torch (+ drive, σ)": torch_term}
        if fast_conv:
            parts["z and its max pool, compiled Winograd"] = lambda: native.conv.winograd_conv_pool(
                s1_last, weight_u, net.paddings[1], pooled_out, indices_out)
        if compiled:
            parts["top-down into s¹, compiled (+ drive, σ)"] = compiled_term
        totals = dict.fromkeys(parts, 0.0)
        for step in range(110):
            for name, part in parts.items():
                start = time.perf_counter()
                part()
                if step >= 10:
                    totals[name] += time.perf_counter() - start
        pool_of = totals.pop("max pool with indices (channels-last z)") - totals["z = W ⋆ s¹, channels-last"]
        totals["max pool with indices (channels-last z)"] = pool_of
        for name, total in totals.items():
            print(f"  {name:<44} {total / 100 * 1e3:7.3f} ms")
        if not (compiled and fast_conv):
            print("  (a compiled kernel is not available here: an AVX-512 build is needed)")
    return {"relax_ms_per_step": best, "ratio": best["torch"] / best["compiled"],
            "parts_ms": {name: total / 100 * 1e3 for name, total in totals.items()}}


if __name__ == "__main__":
    main()
