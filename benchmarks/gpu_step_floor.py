"""The floor of a training step on a GPU: the bench case ``proto-mlp-1h`` (784-512-10, T=30 K=10,
β=0.1, Adam) written by hand as the fewest kernels, captured in one CUDA graph.

    python -m benchmarks.gpu_step_floor [--batch 50 --batch 500] [--batches 2000] [--rounds 3]

One step, all in closed form (σ = sigmoid; drive d = x W_0ᵀ + b_1 once per batch)::

    free (T steps), nudged (K steps, from s*):   s¹ ← σ(d + s² W_1),  s² ← σ(s¹ W_1ᵀ + b_2 + β(y − s²))
    −ΔW_0 = (1/βB)(s¹* − s¹^β)ᵀ x,   −ΔW_1 = (1/βB)(s²* s¹*ᵀ − s²^β s¹^βᵀ),   biases alike
    Adam (fused, capturable)

It is a measuring stick for eprun's steps replayed from CUDA graphs (``eprun bench --device
cuda``), printed as training samples/s per batch size, the best of ``--rounds`` rounds of
``--batches`` replays; nothing of eprun is used.
"""

from __future__ import annotations

import argparse
import time

import torch


def floor(batch: int, batches: int, rounds: int, T: int = 30, K: int = 10, beta: float = 0.1) -> float:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w0 = (torch.rand(512, 784, device=dev, generator=g) - 0.5) * 2 / 784 ** 0.5
    w1 = (torch.rand(10, 512, device=dev, generator=g) - 0.5) * 2 / 512 ** 0.5
    b1, b2 = torch.zeros(512, device=dev), torch.zeros(10, device=dev)
    params = [w0, b1, w1, b2]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True, capturable=True)
    x = torch.rand(batch, 784, device=dev, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (batch,), device=dev, generator=g), 10).float()

    def relax(d, s1, s2, steps, nudge):
        for _ in range(steps):
            s1_new = torch.sigmoid(torch.addmm(d, s2, w1))
            pre = torch.addmm(b2, s1, w1.T)
            if nudge:
                pre = pre + beta * (y - s2)
            s1, s2 = s1_new, torch.sigmoid(pre)
        return s1, s2

    def step():
        d = torch.addmm(b1, x, w0.T)
        s1, s2 = relax(d, torch.zeros(batch, 512, device=dev), torch.zeros(batch, 10, device=dev), T, False)
        n1, n2 = relax(d, s1, s2, K, True)
        c = 1.0 / (beta * batch)
        d1, d2 = (s1 - n1) * c, (s2 - n2) * c
        torch.mm(d1.T, x, out=w0.grad)
        torch.sum(d1, 0, out=b1.grad)
        torch.mm(s2.T, s1, out=w1.grad).addmm_(n2.T, n1, alpha=-1.0).mul_(c)
        torch.sum(d2, 0, out=b2.grad)
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            graph.replay()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batches * batch / best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results = {}
    for batch in args.batch or [50, 500]:
        results[batch] = floor(batch, args.batches, args.rounds)
        print(f"floor, 784-512-10 EP T=30 K=10 Adam, batch {batch}: {results[batch]:,.0f} training samples/s")
    return results


if __name__ == "__main__":
    main()
