"""EP's update under each ``train.precision`` setting, against float64 on the same device, per
parameter; and the time of a training step under each.

    python -m benchmarks.precision_cuda [--recipe ernoult2019/proto-mlp-1h-adam] [--recipe …]
                                        [--batches 3] [--rounds 3] [--device cpu] [--batch B]

Each recipe's net at its initial weights (seed 0) and its rule (its β, T, K, estimator) compute
the update −Δθ that the rule writes into ``.grad`` on a batch of random inputs of the dataset's
shape (the recipe's batch size, or ``--batch``) in float64 — the reference — and in float32 with
``train.precision`` float32 (TF32 off), tf32 (cuBLAS and cuDNN on the tensor cores' TF32; CUDA
only) and bf16 (the relaxation's products on bfloat16 operands, states and update float32); for
each: ‖u − u₆₄‖/‖u₆₄‖ and cos(u, u₆₄) per parameter (worst over parameters printed), and the
best of ``--rounds`` timings of ``--batches`` training steps (``--batches 0``: none). On the CPU
(``--device cpu``) the compiled kernels run the float32 setting, torch's bfloat16 kernels the
bf16 one: its errors are bf16's, its time is not the GPU's. Returns the figures.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def update(recipe, dtype, x, y) -> list[torch.Tensor]:
    from eprun.assemble import build_network, build_rule

    device = x.device
    net = build_network(recipe, tuple(x.shape[1:]), 10, device, dtype)
    rule = build_rule(recipe, net)
    net.zero_grad(set_to_none=False)
    rule.train_step(x.to(dtype), y)
    return [p.grad.detach().clone() for p in net.parameters()]


def step_time(recipe, x, y, batches: int, rounds: int) -> float:
    from eprun.assemble import build_network, build_rule
    from eprun.optim import build_optimizer

    net = build_network(recipe, tuple(x.shape[1:]), 10, x.device)
    rule = build_rule(recipe, net)
    opt = build_optimizer(recipe.optim, net.layer_groups())
    rule.attach_optimizer(opt)

    def steps():
        for _ in range(batches):
            opt.zero_grad(set_to_none=False)
            rule.train_step(x, y)
            if not rule.steps_optimizer:
                opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    steps()
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        steps()
        best = min(best, time.perf_counter() - start)
    return best / batches


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", default=None)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=None, help="instead of the recipe's batch size")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from eprun import catalog, precision
    from eprun.data import dataset_info
    from eprun.recipe import load_recipe

    results = {}
    for name in args.recipe or ["ernoult2019/proto-mlp-1h-adam", "laborieux2021/cifar10-symmetric"]:
        recipe = load_recipe(catalog.resolve(name))
        info = dataset_info(recipe.data.dataset)
        g = torch.Generator().manual_seed(0)
        batch = args.batch or recipe.data.batch_size
        x = torch.rand(batch, *info.input_shape, generator=g).to(device)
        y = torch.randint(0, info.num_classes, (batch,), generator=g).to(device)
        precision.apply("float32", device)
        reference = update(recipe, torch.float64, x, y)
        rows = {}
        for setting in ("float32", "tf32", "bf16") if device.type == "cuda" else ("float32", "bf16"):
            precision.apply(setting, device)
            got = update(recipe, torch.float32, x, y)
            errors = [float((u.double() - r).norm() / r.norm().clamp_min(1e-300)) for u, r in zip(got, reference)]
            cosines = [float((u.double().flatten() @ r.flatten()) / (u.double().norm() * r.norm()).clamp_min(1e-300))
                       for u, r in zip(got, reference)]
            speed = batch / step_time(recipe, x, y, args.batches, args.rounds) if args.batches else None
            rows[setting] = {"worst_relative_error": max(errors), "worst_cosine": min(cosines),
                             "relative_error_per_parameter": errors, "cosine_per_parameter": cosines,
                             "samples_per_s": speed}
            print(f"{name} (β={recipe.rule.beta}, batch {batch}, {device.type}) {setting:7s}: worst ‖u − u64‖/‖u64‖ "
                  f"{max(errors):.1e}, worst cosine {min(cosines):.6f}"
                  + (f", {speed:,.0f} samples/s" if speed else "")
                  + "\n    per parameter: " + ", ".join(f"{e:.1e} ({c:.3f})" for e, c in zip(errors, cosines)))
        precision.apply("float32", device)
        results[name] = rows
    return results


if __name__ == "__main__":
    main()
