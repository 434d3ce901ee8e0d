"""Where a training batch of the 784-512-10 EP net goes, part by part, and the relaxation step
through the compiled kernel against the torch path, side by side in one process.

    python -m benchmarks.mlp_breakdown [--threads N] [--batch 50] [--repeats 7]

Every figure is the best of ``--repeats`` rounds (the least disturbed by other work on the
machine). Random inputs of MNIST's shape; weights as built by ``ernoult2019/proto-mlp-1h-adam``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def best_ms(fn, calls: int, repeats: int) -> float:
    """Best over ``repeats`` rounds of the mean milliseconds of ``calls`` calls."""
    for _ in range(max(2, calls // 10)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from eprun import native
    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup
    from eprun.nets.products import linear
    from eprun.optim import build_optimizer

    setup = CaseSetup(CASES["proto-mlp-1h"], BenchOptions(overrides=[f"data.batch_size={args.batch}"]),
                   torch.device("cpu"), torch.float32)
    net, rule, train = setup.eprun_side()
    x, y = setup.data(1, args.batch, "breakdown")[0]
    T, K, beta = rule.cfg.T, rule.cfg.K, rule.cfg.beta
    print(f"784-512-10, batch {args.batch}, T={T}, K={K}, {torch.get_num_threads()} thread(s); "
          f"native: {native.status()}")

    def engine(name: str) -> None:
        os.environ["EPRUN_NATIVE"] = "0" if name == "torch" else "auto"
        native.reset()

    with torch.no_grad():
        drive = net.input_drive(x)
        target = net.target(y, x)
        free = rule.free_phase(drive)
        nudged = net.relax(drive, [s.clone() for s in free], K, beta, target)
        print("\nrelaxation step (µs), free phase of T steps / T:")
        steps = {}
        for name in ("torch", "native"):
            engine(name)
            steps[name] = best_ms(lambda: rule.free_phase(drive), 20, args.repeats) / T * 1e3
            assert net.last_relax_engine == name, net.last_relax_engine
            print(f"  {name:7s} {steps[name]:8.1f}")
        print(f"  ratio   {steps['torch'] / steps['native']:8.2f}×")

        print("\nparts of a training batch (ms):")
        parts = {}
        for name in ("torch", "native"):
            engine(name)
            parts[name] = {"input drive a·(W₀x + b₁) + c": best_ms(lambda: net.input_drive(x), 50, args.repeats)}
            if name == "native":
                assert net.ep_phases(drive, y, T, K, beta) is not None
                parts[name][f"free + nudged phases (T={T}, K={K})"] = best_ms(
                    lambda: net.ep_phases(drive, y, T, K, beta), 20, args.repeats)
            else:
                parts[name][f"free + nudged phases (T={T}, K={K})"] = best_ms(
                    lambda: (rule.free_phase(drive), net.relax(drive, [s.clone() for s in free], K, beta, target)),
                    20, args.repeats)
            parts[name]["update into .grad"] = best_ms(
                lambda: net.accumulate_dphi_dtheta_difference_(x, free, nudged, 1.0 / beta), 50, args.repeats)
    # torch's fused Adam through its own step and zero_grad (torch column), through the short path
    # of eprun.lean_optimizers (native column); the same kernel
    optimizers = {"torch": torch.optim.Adam([{"params": g, "lr": 5e-4} for g in net.layer_groups()], fused=True),
                  "native": build_optimizer(setup.recipe.optim, net.layer_groups())}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    for name, optimizer in optimizers.items():
        parts[name]["fused Adam step"] = best_ms(optimizer.step, 50, args.repeats)
        parts[name]["zero_grad"] = best_ms(lambda: optimizer.zero_grad(set_to_none=False), 50, args.repeats)
    optimizer = optimizers["native"]
    with torch.no_grad():
        # Adam writes W₀ in place: right after the drive has read W₀ on every thread, that write
        # may cost more than in the loop above (compare a product of the same shape with another matrix)
        other = torch.randn_like(net.weights[0])
        in_sequence = {
            "input drive, then Adam": best_ms(lambda: (net.input_drive(x), optimizer.step()), 50, args.repeats),
            "same product with another matrix, then Adam": best_ms(
                lambda: (linear(net.flatten(x), other, net.biases[0]), optimizer.step()), 50, args.repeats),
        }
    whole = {}
    _, _, torch_train = torch_step(setup)
    for name, step in (("torch", torch_train), ("native", train)):
        engine(name)
        whole[name] = best_ms(lambda: step(x, y), 30, args.repeats)
    os.environ.pop("EPRUN_NATIVE", None)
    native.reset()
    print(f"  {'':38s} {'torch':>8s} {'native':>8s}")
    for part in parts["torch"]:
        print(f"  {part:38s} {parts['torch'][part]:8.3f} {parts['native'][part]:8.3f}")
    for name in ("torch", "native"):
        parts[name]["rest"] = whole[name] - sum(parts[name].values())
    print(f"  {'rest (whole − parts timed alone)':38s} {parts['torch']['rest']:8.3f} {parts['native']['rest']:8.3f}")
    print(f"  {'whole training step':38s} {whole['torch']:8.3f} {whole['native']:8.3f}")
    print(f"  samples/s {args.batch / whole['torch'] * 1e3:,.0f} (torch) · {args.batch / whole['native'] * 1e3:,.0f} "
          f"(native)")
    print("\nin sequence (ms):")
    for part, ms in in_sequence.items():
        print(f"  {part:44s} {ms:8.3f}")
    fixed_costs(args.repeats)
    after_the_baseline(setup, args.batch)
    steps_computed(setup, args.batch)


def torch_step(setup):
    """(net, rule, training step) as ``Setup.eprun_side`` builds them, but stepping torch's own
    fused Adam (its ``step`` and ``zero_grad``): the "torch" column of the breakdown."""
    from eprun.assemble import build_rule

    net = setup._copy()
    rule = build_rule(setup.recipe, net)
    optimizer = torch.optim.Adam([{"params": g, "lr": 5e-4} for g in net.layer_groups()], fused=True)

    def train(x, y):
        optimizer.zero_grad(set_to_none=False)
        rule.train_step(x, y)
        optimizer.step()

    return net, rule, train


def fixed_costs(repeats: int) -> None:
    """What a training step costs whatever the batch: the 784-512-10 step at batch 2 (the passes
    over W₀-sized arrays, and everything around the kernels), and a 16-8-10 net's step at batch 2
    (Python and dispatch alone)."""
    from eprun.bench.cases import CASES, BenchOptions
    from eprun.bench.measure import CaseSetup
    from eprun.nets.mlp import MLPConfig, PrototypicalMLP
    from eprun.optim import build_optimizer
    from eprun.recipe import OptimConfig
    from eprun.rules.ep import EP, EPConfig

    print("\nfixed costs of a training step (ms):")
    setup = CaseSetup(CASES["proto-mlp-1h"], BenchOptions(overrides=["data.batch_size=2"]), torch.device("cpu"),
                   torch.float32)
    _, _, train = setup.eprun_side()
    x, y = setup.data(1, 2, "fixed")[0]
    print(f"  {'784-512-10, batch 2':44s} {best_ms(lambda: train(x, y), 200, repeats):8.3f}")
    tiny = PrototypicalMLP(MLPConfig(hidden=[8], activation="sigmoid"), (16,), 10, torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=30, K=10, beta=0.1), tiny, torch.Generator().manual_seed(0))
    optimizer = build_optimizer(OptimConfig(kind="adam", lr=[5e-4, 5e-4]), tiny.layer_groups())
    x, y = torch.rand(2, 16), torch.randint(0, 10, (2,))

    def step():
        optimizer.zero_grad(set_to_none=False)
        rule.train_step(x, y)
        optimizer.step()
    print(f"  {'16-8-10, batch 2 (Python and dispatch)':44s} {best_ms(step, 500, repeats):8.3f}")


def after_the_baseline(setup, batch: int, rounds: int = 5, size: int = 20) -> None:
    """eprun's batches right after a round of baseline batches, as ``eprun bench`` alternates
    them: the median over ``rounds`` rounds of each position in a round of ``size`` batches."""
    import statistics
    import time

    _, _, train = setup.eprun_side()
    _, base = setup.baseline_side()
    pool = setup.data(4, batch, "rounds")
    for i in range(2):
        base(*pool[i])
        train(*pool[i])
    times = [[] for _ in range(size)]
    for _ in range(rounds):
        for i in range(size):
            base(*pool[i % 4])
        for i in range(size):
            start = time.perf_counter()
            train(*pool[i % 4])
            times[i].append(time.perf_counter() - start)
    print(f"\neprun's batches after {size} baseline batches, by position (median of {rounds} rounds, ms):")
    print("  " + " ".join(f"{statistics.median(t) * 1e3:.2f}" for t in times))


def steps_computed(setup, batch: int, batches: int = 300) -> None:
    """The steps the kernel computes per example with a fixed T and K (it stops an example at a
    bitwise fixed point), at the initial weights and after ``batches`` training batches of random
    MNIST-shaped data, per phase."""
    from eprun.native import dense as native_dense

    calls = []
    phases = native_dense.ep_dense_phases

    def counting(*args, **kwargs):
        taken_free, taken_nudged, loss = phases(*args, **kwargs)
        calls.append((float(taken_free.float().mean()), float(taken_nudged.float().mean())))
        return taken_free, taken_nudged, loss

    net, rule, train = setup.eprun_side()
    T, K = rule.cfg.T, rule.cfg.K
    data = setup.data(batches + 10, batch, "steps")
    native_dense.ep_dense_phases = counting
    try:
        print("\nsteps computed per example by the kernel (fixed T, K), mean:")
        for label, run in (("initial weights", data[:10]), (f"after {batches} batches", data[batches:])):
            calls.clear()
            for x, y in run:
                train(x, y)
            free = sum(c[0] for c in calls) / len(calls)
            nudged = sum(c[1] for c in calls) / len(calls)
            print(f"  {label:22s} free {free:5.1f} of {T} · nudged {nudged:5.1f} of {K}")
            if label == "initial weights":
                for x, y in data[10:batches]:
                    train(x, y)
    finally:
        native_dense.ep_dense_phases = phases


if __name__ == "__main__":
    main()
