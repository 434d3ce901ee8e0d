"""EP's update of the 784-512-10 net in reduced precision, against the same update in float64.

    python -m benchmarks.precision [--threads N] [--batches 200] [--beta 0.1]

The net of ``ernoult2019/proto-mlp-1h-adam`` (T=30, K=10) is trained in float32 for
``--batches`` batches (random MNIST-shaped data, or MNIST when ``EPRUN_DATA`` points at it), then
on one batch of 50 the one-sided EP update −Δθ = (1/β)(∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β)) is computed from
the same weights in

* float64 (the reference),
* float32: the compiled kernels, and torch alone (``EPRUN_NATIVE=0``),
* float32 with torch's matmul precision "medium" (products may run in bfloat16 where the CPU
  has it),
* bfloat16: weights, states and products (torch path),

and each is compared with the reference: ‖u − u₆₄‖/‖u₆₄‖ and the cosine of u with u₆₄ for every
parameter. The same is given, as a scale, for the BPTT gradient of the same weights (float64)
against EP's float64 estimate: the estimate's own bias at this β.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch


def relative(u: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(‖u − ref‖/‖ref‖, cos(u, ref)) in float64."""
    u, ref = u.double().flatten(), ref.double().flatten()
    rel = float((u - ref).norm() / ref.norm())
    cos = float(u @ ref / (u.norm() * ref.norm()))
    return rel, cos


@contextlib.contextmanager
def matmul_precision(level: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def ep_update(net, recipe, x, y, dtype) -> list[torch.Tensor]:
    """−Δθ of one batch from ``net``'s weights, in ``dtype``, as the rule writes it into .grad."""
    from eprun.assemble import build_rule

    net = copy.deepcopy(net).to(dtype)
    rule = build_rule(recipe, net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    rule.train_step(x.to(dtype), y)
    return [p.grad.detach().clone() for p in net.phi_parameters()]


def bptt_gradient(net, recipe, x, y) -> list[torch.Tensor]:
    """The gradient of the loss at s_T through T steps of the dynamics (float64)."""
    from eprun.reference import autograd_ep as baseline

    net = copy.deepcopy(net).double()
    for p in net.parameters():
        p.grad = None
    baseline.bptt_train_step(net, x.double(), y, recipe.rule.T)
    return [p.grad.detach().clone() for p in net.phi_parameters()]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from benchmarks.variants import engine
    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup

    setup = CaseSetup(CASES["proto-mlp-1h"], BenchOptions(overrides=[f"rule.beta={args.beta}"]), torch.device("cpu"),
                   torch.float32)
    net, rule, train = setup.eprun_side()
    data = setup.data(args.batches + 1, setup.recipe.data.batch_size, "precision")
    for x, y in data[:args.batches]:
        train(x, y)
    x, y = data[-1]
    names = [f"{kind}{n}" for n in range(len(net.weights)) for kind in ("W", "b")]
    reference = ep_update(net, setup.recipe, x, y, torch.float64)
    with engine("auto"):
        rows = {"float32, compiled kernels": ep_update(net, setup.recipe, x, y, torch.float32)}
    with engine("0"):
        rows["float32, torch"] = ep_update(net, setup.recipe, x, y, torch.float32)
        with matmul_precision("medium"):
            rows["float32, matmul precision medium"] = ep_update(net, setup.recipe, x, y, torch.float32)
        rows["bfloat16"] = ep_update(net, setup.recipe, x, y, torch.bfloat16)
    rows["BPTT gradient, float64 (scale)"] = bptt_gradient(net, setup.recipe, x, y)

    print(f"784-512-10, T={rule.cfg.T}, K={rule.cfg.K}, β={args.beta}, batch {x.shape[0]}, after {args.batches} "
          f"float32 training batches; against EP's float64 update, per parameter: ‖u − u64‖/‖u64‖ (cos)")
    print(f"  {'':34s} " + " ".join(f"{n:>17s}" for n in names))
    results = {}
    for label, update in rows.items():
        cells = [relative(u, r) for u, r in zip(update, reference)]
        results[label] = {name: {"relative_error": rel, "cosine": cos} for name, (rel, cos) in zip(names, cells)}
        print(f"  {label:34s} " + " ".join(f"{rel:9.1e} ({cos:5.3f})" for rel, cos in cells))
    return results


if __name__ == "__main__":
    main()
