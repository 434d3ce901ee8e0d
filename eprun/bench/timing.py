"""Timing and memory: the clock around batches (side by side, alternating), the machine's matmul
peak, and the peak tensor memory of one call."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from typing import Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 5) -> dict:
    """The machine's matmul throughput: the best of ``reps`` timed size×size products (after one
    untimed), 2·size³ FLOP each. Default size: 2048 on CPU, 8192 on CUDA. On the CPU in float32
    the product runs both through torch.mm (MKL) and through oneDNN (:mod:`eprun.nets.products`),
    and the faster counts (on AMD CPUs with AVX-512, MKL runs its AVX2 kernels)."""
    from eprun.nets import products

    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.rand(size, size, device=device, dtype=dtype)
    b = torch.rand(size, size, device=device, dtype=dtype)
    out = torch.empty_like(a)
    products_ = [("torch.mm", lambda: torch.mm(a, b, out=out))]
    if device.type == "cpu" and dtype == torch.float32 and products.onednn_status()["onednn"]:
        products_.append(("oneDNN", lambda: products.linear(a, b)))
    best, best_name = math.inf, ""
    with torch.no_grad():
        for name, product in products_:
            product()
            sync(device)
            for _ in range(reps):
                start = time.perf_counter()
                product()
                sync(device)
                elapsed = time.perf_counter() - start
                if elapsed < best:
                    best, best_name = elapsed, name
    flops = 2.0 * size ** 3
    return {"peak_gflop_per_s": flops / best / 1e9,
            "peak_method": f"{size}x{size} {str(dtype).replace('torch.', '')} matmul, best of {reps}"
                           + (f" through torch.mm and oneDNN: {best_name}" if len(products_) > 1 else "")}


def timed(fn, pool, batches: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``batches`` calls of fn(x, y) over the pool of batches, after ``warmup`` calls."""
    for i in range(warmup):
        fn(*pool[i % len(pool)])
    sync(device)
    start = time.perf_counter()
    for i in range(batches):
        fn(*pool[i % len(pool)])
    sync(device)
    return time.perf_counter() - start


def timed_pair(fn_base, fn_ours, pool, batches: int, warmup: int, device: torch.device,
                rounds: int = 5) -> tuple[float, float]:
    """(baseline, eprun) seconds for ``batches`` calls of fn(x, y) each, measured side by side:
    after ``warmup`` calls of each, the calls run in up to ``rounds`` rounds that alternate
    baseline and eprun; each side's time is its median seconds per call over the rounds, times
    ``batches``. A burst of other work on the machine then lands in one round of one side and
    does not move the median."""
    for i in range(warmup):
        fn_base(*pool[i % len(pool)])
        fn_ours(*pool[i % len(pool)])
    rounds = max(1, min(rounds, batches))
    sizes = [batches // rounds + (1 if r < batches % rounds else 0) for r in range(rounds)]
    per_call = {"base": [], "ours": []}
    start_index = 0
    for size in sizes:
        for side, fn in (("base", fn_base), ("ours", fn_ours)):
            sync(device)
            start = time.perf_counter()
            for i in range(start_index, start_index + size):
                fn(*pool[i % len(pool)])
            sync(device)
            per_call[side].append((time.perf_counter() - start) / size)
        start_index += size
    return (statistics.median(per_call["base"]) * batches, statistics.median(per_call["ours"]) * batches)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the profiler's native start/stop lines)."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


CPU_MEMORY_METHOD = ("peak of the running sum of CPU tensor allocations and frees during one batch "
                     "(torch.profiler, profile_memory=True): tensor memory live at once beyond what was live before")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated during one batch (peak statistics reset before it) "
                      "minus torch.cuda.memory_allocated before it")


def peak_memory(fn, device: torch.device) -> Optional[int]:
    """Peak bytes of tensor memory that one call of ``fn()`` holds beyond what was live before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    try:
        with quiet_stderr():
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = prof.profiler.kineto_results.events()
    except (RuntimeError, AttributeError):  # no kineto in this torch build
        return None
    changes = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak
