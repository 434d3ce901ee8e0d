"""``eprun bench``: eprun's training step and evaluation timed against the autograd-of-Φ
baseline of the same step (:mod:`benchmarks.autograd_ep`), side by side in one process.

Each case takes its network, rule, batch size and optimiser from the bundled recipe it names
(at the paper's sizes) and runs on random data of the dataset's shape, drawn with a fixed
seed and placed on the device before any timing. Per case:

1. **Same update.** From the same weights, on the same batch, eprun's rule and the baseline
   compute the update (``.grad`` for EP and BPTT, the parameter change of the whole step for
   C-EP, whose rule steps the optimiser itself); the largest relative difference over the
   parameters, ‖u_eprun − u_baseline‖ / ‖u_baseline‖, is reported in the benchmark's dtype and,
   on the first few examples, in float64 (see :data:`CHECK64_EXAMPLES`), and so is that of
   the free phase's prediction.
2. **Training throughput.** Warm-up batches, then ``time.perf_counter`` around N batches
   (``torch.cuda.synchronize`` before reading the clock on CUDA). eprun's step is
   ``rule.train_step`` plus the recipe's optimiser (fused where torch has it); the baseline's
   is its autograd step plus the same optimiser in torch's default implementation. Each
   starts from the same weights and trains its own copy.
3. **Evaluation throughput.** The free phase only (T steps, prediction from s*), at the
   training batch size; eprun's ``rule.evaluate`` against the baseline's autograd free phase.
4. **Peak memory** of one training batch and one evaluation batch, for each. CUDA:
   ``torch.cuda.max_memory_allocated`` during the batch (statistics reset before it) minus
   ``torch.cuda.memory_allocated`` before it. CPU: the resident-set high-water mark cannot be
   reset per phase, so every allocation and free of the CPU tensor allocator during the batch
   is recorded by ``torch.profiler`` (``profile_memory=True``) and the peak of their running
   sum is reported — the most tensor memory live at once beyond what was live before the
   batch. Memory held across batches (parameters, optimiser state, eprun's scratch state
   buffers, allocated in the warm-up) is not counted in either.
5. **Arithmetic.** Multiply-adds of eprun's step counted from the shapes (:func:`train_macs`,
   :func:`eval_macs`), FLOP = 2 × multiply-adds, divided by the measured time: GFLOP/s, and its
   fraction of the machine's matmul throughput: the best time of a large square matmul in the
   benchmark's dtype, measured before the first case and after the last (:func:`measure_peak`).

``eval-mlp-1h-test`` times the evaluation (free phase, the recipe's evaluation batch size) of
the 784-512-10 net over a 10,000-image test set of random data: seconds.

Adding a case is one :class:`Case` in :data:`CASES`; a rule needs its :class:`Baseline` in
:data:`BASELINES` (and, for the GFLOP/s columns, its count in :func:`train_macs`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from benchmarks import autograd_ep as baseline
from eprun import catalog, schema
from eprun.assemble import build_network, build_rule, generator
from eprun.data import dataset_info
from eprun.errors import EprunError
from eprun.nets.conv import ConvNet
from eprun.nets.energy_mlp import EnergyMLP
from eprun.nets.mlp import PrototypicalMLP
from eprun.optim import build_optimizer
from eprun.recipe import Recipe, recipe_from_data

# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One benchmark: a bundled recipe (optionally with its ``rule:`` section replaced) and the
    default numbers of batches, per device type (cpu, cuda)."""

    name: str
    recipe: str
    about: str
    batches: tuple[int, int] = (10, 50)  # timed training batches
    eval_batches: tuple[int, int] = (10, 50)  # timed evaluation batches
    warmup: tuple[int, int] = (2, 5)
    rule: Optional[dict] = None  # replaces the recipe's rule section
    on_cpu_by_default: bool = True  # part of the default suite on CPU
    heavy_on_cpu: bool = False  # seconds per batch on CPU: left out of a --quick suite there
    eval_test: bool = False  # the evaluation-only test-set case


CASES: dict[str, Case] = {case.name: case for case in [
    Case("proto-mlp-1h", "ernoult2019/proto-mlp-1h-adam",
         "784-512-10 prototypical EP, T=30 K=10, batch 50, Adam", batches=(20, 100), eval_batches=(20, 100)),
    Case("proto-mlp-3h", "ernoult2019/proto-mlp-3h",
         "784-512-512-512-10 prototypical EP, T=180 K=20, batch 20, SGD", batches=(4, 30), eval_batches=(4, 30),
         warmup=(1, 3), heavy_on_cpu=True),
    Case("eb-mlp-1h", "ernoult2019/eb-mlp-1h",
         "784-512-10 energy-based EP, ε=0.2, T=100 K=12, batch 20, SGD", batches=(10, 50), eval_batches=(10, 50)),
    Case("conv-mnist", "ernoult2019/proto-conv",
         "conv5-32, pool, conv5-64, pool, fc 10, T=200 K=10, batch 20, SGD", batches=(2, 20),
         eval_batches=(2, 20), warmup=(1, 3), heavy_on_cpu=True),
    Case("conv-cifar10", "laborieux2021/cifar10-one-sided",
         "CIFAR-10 ConvNet 128-256-512-512, T=250 K=30, batch 128, SGD momentum (CPU: ~20 min per batch)",
         batches=(1, 5), eval_batches=(1, 5), warmup=(0, 2), on_cpu_by_default=False, heavy_on_cpu=True),
    Case("bptt-mlp-1h", "ernoult2019/proto-mlp-1h-adam",
         "784-512-10, BPTT through T=30 steps, batch 50, Adam", batches=(10, 50), eval_batches=(20, 100),
         rule={"kind": "bptt", "T": 30}),
    Case("cep-mlp-1h", "ernoult2020/cep-1h",
         "784-512-10 C-EP, T=40 K=15, batch 20, SGD at every nudged step", batches=(10, 50), eval_batches=(10, 50)),
    Case("dtp-lenet", "ernoult2022/mnist-lenet-ldrl",
         "LeNet-style conv 16-32 + linear, DTP/L-DRL, 3 feedback iterations per layer, batch 64, SGD; "
         "baseline: BP on the same net (DTP has no Φ: the ratio is BP's cost over DTP's)",
         batches=(5, 50), eval_batches=(20, 100), rule={"kind": "dtp", "beta": 0.7, "noise": 0.1,
                                                         "feedback_iterations": 3, "feedback_lr": [0.002, 0.05]}),
    Case("eval-mlp-1h-test", "ernoult2019/proto-mlp-1h-adam",
         "784-512-10 evaluation (free phase, T=30) of a 10,000-image test set", eval_test=True,
         batches=(1, 1), eval_batches=(1, 1), warmup=(1, 2)),
]}

EVAL_TEST_IMAGES = 10_000
EVAL_TEST_ROUNDS = 3  # alternating whole passes over the test set, baseline and eprun
#: The update is also compared in float64, on this many examples of the first batch. There the
#: two formulations agree to rounding. In float32 a max-pooling conv net can differ by a percent:
#: eprun takes the argmax of W ⋆ s and adds the bias after pooling, Φ's autograd the argmax of
#: W ⋆ s + b; at a window whose two largest values nearly tie, rounding can pick different
#: positions, and the relaxation carries the difference on (either side can be the one that
#: strays from float64: it is rounding, not a difference in the algorithm).
CHECK64_EXAMPLES = 8


def _plain_optimizer(cfg, layer_groups) -> torch.optim.Optimizer:
    """The recipe's optimiser in torch's default implementation, as reference code builds it."""
    n = len(layer_groups)
    lrs = cfg.lr if isinstance(cfg.lr, list) else [cfg.lr] * n
    decays = cfg.weight_decay if isinstance(cfg.weight_decay, list) else [cfg.weight_decay] * n
    groups = [{"params": p, "lr": lr, "weight_decay": wd} for p, lr, wd in zip(layer_groups, lrs, decays)]
    if cfg.kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.kind == "adam":
        return torch.optim.Adam(groups, lr=lrs[0], betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.kind == "adamw":
        return torch.optim.AdamW(groups, lr=lrs[0], betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optimiser {cfg.kind!r}")


def _ep_baseline(net, cfg, optimizer):
    def run(x, y):
        baseline.ep_train_step(net, x, y, cfg.T, cfg.K, cfg.beta, cfg.estimator)
        optimizer.step()
    return run


def _bptt_baseline(net, cfg, optimizer):
    def run(x, y):
        baseline.bptt_train_step(net, x, y, cfg.T)
        optimizer.step()
    return run


def _cep_baseline(net, cfg, optimizer):
    def run(x, y):
        baseline.cep_train_step(net, x, y, cfg.T, cfg.K, cfg.beta, optimizer, cfg.estimator)
    return run


def _free_phase_prediction(net, cfg):
    return lambda x: baseline.predict(net, x, cfg.T)


def _bp_on_same_net(net, cfg, optimizer):
    """Target propagation's reference point: one BP step (forward, cross-entropy, backward) on the same net."""
    def run(x, y):
        with torch.enable_grad():
            net.loss(net.feedforward(x), y).mean().backward()
        optimizer.step()
    return run


def _forward_prediction(net, cfg):
    def predict(x):
        with torch.no_grad():
            return net.feedforward(x)[-1]
    return predict


@dataclass(frozen=True)
class Baseline:
    """A rule's baseline: ``train(net, rule config, optimiser)`` gives the training step fn(x, y),
    optimiser step included (with a no-op optimiser its update stays in ``.grad``);
    ``predict(net, rule config)`` gives fn(x) → logits, the evaluation."""

    train: Callable
    predict: Callable
    same_update: bool = True  # the baseline computes eprun's update (checked); False: a different method


#: rule.kind → its baseline. A rule without an entry here cannot be benchmarked.
BASELINES: dict[str, Baseline] = {
    "ep": Baseline(_ep_baseline, _free_phase_prediction),
    "bptt": Baseline(_bptt_baseline, _free_phase_prediction),
    "cep": Baseline(_cep_baseline, _free_phase_prediction),
    "dtp": Baseline(_bp_on_same_net, _forward_prediction, same_update=False),
}
#: the rules whose baseline differentiates Φ (the network must have one)
PHI_RULES = {"ep", "bptt", "cep"}


# --------------------------------------------------------------------------- options


@dataclass
class BenchOptions:
    only: list[str] = field(default_factory=list)
    batches: Optional[int] = None  # timed batches per case (training and evaluation); None: the case's
    warmup: Optional[int] = None
    device: str = "auto"
    dtype: str = "float32"
    quick: bool = False  # 1 timed batch, 1 warm-up, a smaller matmul peak and test set
    overrides: list[str] = field(default_factory=list)  # dotted recipe overrides for every case


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve(options: BenchOptions) -> tuple[list[Case], list[str], torch.device, torch.dtype]:
    """The cases to run, the default cases left out (with why), the device and the dtype."""
    if options.dtype not in DTYPES:
        raise EprunError(f"--dtype: expected one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if options.device not in ("auto", "cpu", "cuda"):
        raise EprunError(f"--device: expected auto, cpu or cuda, got {options.device!r}")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise EprunError("--device cuda: CUDA is not available here (use auto or cpu)")
    if options.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(options.device)
    if options.batches is not None and options.batches < 1:
        raise EprunError(f"--batches: must be ≥ 1, got {options.batches}")
    if options.warmup is not None and options.warmup < 0:
        raise EprunError(f"--warmup: must be ≥ 0, got {options.warmup}")
    unknown = [n for n in options.only if n not in CASES]
    if unknown:
        raise EprunError(f"--only {unknown[0]}: no such case (cases: {', '.join(CASES)})")
    skipped = []
    if options.only:
        cases = [CASES[n] for n in dict.fromkeys(options.only)]
    else:
        cases = []
        for case in CASES.values():
            if device.type == "cpu" and not case.on_cpu_by_default:
                skipped.append(f"{case.name} (not in the default CPU suite: tens of minutes per batch here; "
                               f"--only {case.name} runs it)")
            elif device.type == "cpu" and options.quick and case.heavy_on_cpu:
                skipped.append(f"{case.name} (seconds per batch on CPU: not in a --quick suite; "
                               f"--only {case.name} runs it)")
            else:
                cases.append(case)
    return cases, skipped, device, DTYPES[options.dtype]


def case_recipe(case: Case, overrides: list[str] = ()) -> Recipe:
    """The case's bundled recipe, its rule section replaced where the case says, then ``overrides``."""
    path = catalog.resolve(case.recipe)
    data, source = schema.read_yaml(path)
    if case.rule is not None:
        data["rule"] = dict(case.rule)
    recipe = recipe_from_data(data, source, list(overrides), default_name=case.name)
    recipe.source = str(path)
    return recipe


# --------------------------------------------------------------------------- arithmetic


def _products(net, batch: int) -> tuple[list[int], list[bool], list[int]]:
    """P_j, the multiply-adds of applying weight layer j once to a batch of B, per net::

        mlp, energy_mlp (sizes n_0 … n_N)    P_j = B·n_j·n_{j+1}
        conv, conv layer j                   P_j = B·C_{j+1}·C_j·k_j²·H'_j·W'_j   (H'_j × W'_j: the
                                             convolution's output, before pooling; C: channels; k: kernel)
        conv, fully connected layer j        P_j = B·|s^j|·|s^{j+1}|

    whether layer j is a convolution, and the energy-based net's lateral products B·n_i² (hidden
    layers i, with ``lateral: true``)."""
    conv_layers = net.n_conv if isinstance(net, ConvNet) else 0
    products, is_conv = [], []
    for j, w in enumerate(net.weights):
        positions = math.prod(net.conv_hw[j]) if j < conv_layers else 1
        products.append(batch * w.numel() * positions)
        is_conv.append(j < conv_layers)
    laterals = [batch * lat.shape[0] ** 2 for lat in getattr(net, "laterals", [])]
    return products, is_conv, laterals


def eval_macs(net, rule_cfg, batch: int) -> int:
    """Multiply-adds of eprun's free phase (``rule.evaluate``) on one batch::

        P_0 + T · S,      S = Σ_{j≥1} 2·P_j + Σ_i B·n_i²

    P_j as in :func:`_products`: the input drive (weight 0, once per batch), then per step every
    weight above the first twice — bottom-up (a product or a convolution) and top-down (the
    transposed product or convolution) — plus the energy-based net's laterals. Elementwise work
    (σ, pooling, the nudge, the optimiser) is not counted, nor the softmax read-out's products.
    """
    if rule_cfg.kind not in PHI_RULES:
        raise ValueError(f"no multiply-add count for rule {rule_cfg.kind!r}")
    p, _, lat = _products(net, batch)
    return p[0] + rule_cfg.T * (2 * sum(p[1:]) + sum(lat))


def train_macs(net, rule_cfg, batch: int) -> int:
    """Multiply-adds of eprun's training step on one batch (terms as in :func:`eval_macs`)::

        EP     P_0 + (T + K·m)·S + U            m = 2 for the symmetric estimator, else 1
        C-EP   P_0 + T·S + K·(P_0 + S + U)      the drive is rebuilt at every nudged step
        BPTT   T·(2·P_0 + 6·Σ_{j≥1} P_j + 3·Σ_i B·n_i²)

    U, the ∂Φ/∂θ difference: dense W_0 one product (the input is shared), P_0; every other dense
    weight two, 2·P_j; laterals 2·B·n². Conv: W_0 the first convolution again (for the argmax)
    and its weight gradient, 2·P_0; a conv weight above, a convolution at each state (argmaxes)
    and one weight gradient over the stacked 2B batch, 4·P_j. BPTT (``net.step`` under autograd):
    per step the forward recomputes every product, the input drive included (Σ_j P_j + Σ_{j≥1} P_j),
    and the backward takes two products per product with a state operand, one (the weight
    gradient) for the drive.

    Per net, EP one-sided, with S_d = Σ_{j≥1} n_j·n_{j+1}:

        mlp          B·[2·n_0·n_1 + 2·(T + K + 1)·S_d]
                     (784-512-10, T=30, K=10, B=50: 2·50·784·512 + 2·41·50·5120 = 61.1 M multiply-adds)
        energy_mlp   the same, plus (T + K + 2)·B·Σ_i n_i² with laterals
        conv         P_0 + (T + K)·(Σ_{j≥1} 2·P_j) + 2·P_0 + Σ_{conv j≥1} 4·P_j + Σ_{fc j} 2·P_j
    """
    p, is_conv, lat = _products(net, batch)
    step = 2 * sum(p[1:]) + sum(lat)
    kind = rule_cfg.kind
    if kind == "bptt":
        return rule_cfg.T * (2 * p[0] + 6 * sum(p[1:]) + 3 * sum(lat))
    update = (2 if is_conv[0] else 1) * p[0] + sum((4 if c else 2) * pj for pj, c in zip(p[1:], is_conv[1:]))
    update += 2 * sum(lat)
    if kind == "cep":
        return p[0] + rule_cfg.T * step + rule_cfg.K * (p[0] + step + update)
    if kind == "ep":
        phases = 2 if rule_cfg.estimator in ("symmetric", "centered") else 1
        return p[0] + (rule_cfg.T + rule_cfg.K * phases) * step + update
    raise ValueError(f"no multiply-add count for rule {kind!r}")


def _flop(count, net, rule_cfg, batch: int) -> Optional[int]:
    """2 × ``count(net, rule_cfg, batch)``, or None where no count is written for this net or rule."""
    if not isinstance(net, (PrototypicalMLP, EnergyMLP, ConvNet)):
        return None
    try:
        return 2 * count(net, rule_cfg, batch)
    except ValueError:
        return None


def describe(net) -> str:
    """784-512-10, 784-512-10 EB (energy-based), 1x28x28 c32-c64 fc10 …"""
    if isinstance(net, ConvNet):
        body = "-".join(f"c{w.shape[0]}" for w in list(net.weights)[:net.n_conv])
        fc = "-".join(str(s[0]) for s in net.state_shapes[net.n_conv:])
        return f"{'x'.join(map(str, net.input_shape))} {body}" + (f" fc{fc}" if fc else "")
    if hasattr(net, "layers"):  # feed-forward net with feedback layers
        first = net.layers[0].in_shape
        return "x".join(map(str, first)) + " " + "-".join(
            (f"c{layer.out_shape[0]}" if len(layer.out_shape) == 3 else str(layer.out_shape[0])) for layer in net.layers)
    text = "-".join(map(str, net.sizes))
    return text + (" EB" if isinstance(net, EnergyMLP) else "")


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, reps: int = 5) -> dict:
    """The machine's matmul throughput: the best of ``reps`` timed size×size products (after one
    untimed), 2·size³ FLOP each. Default size: 2048 on CPU, 8192 on CUDA. On the CPU in float32
    the product runs both through torch.mm (MKL) and through oneDNN (:mod:`eprun.nets.products`),
    and the faster counts: on AMD CPUs with AVX-512, MKL runs its AVX2 kernels and reaches about
    half of what oneDNN does."""
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
            _sync(device)
            for _ in range(reps):
                start = time.perf_counter()
                product()
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed < best:
                    best, best_name = elapsed, name
    flops = 2.0 * size ** 3
    return {"peak_gflop_per_s": flops / best / 1e9,
            "peak_method": f"{size}x{size} {str(dtype).replace('torch.', '')} matmul, best of {reps}"
                           + (f" through torch.mm and oneDNN: {best_name}" if len(products_) > 1 else "")}


def _timed(fn, pool, batches: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``batches`` calls of fn(x, y) over the pool of batches, after ``warmup`` calls."""
    for i in range(warmup):
        fn(*pool[i % len(pool)])
    _sync(device)
    start = time.perf_counter()
    for i in range(batches):
        fn(*pool[i % len(pool)])
    _sync(device)
    return time.perf_counter() - start


def _timed_pair(fn_base, fn_ours, pool, batches: int, warmup: int, device: torch.device,
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
            _sync(device)
            start = time.perf_counter()
            for i in range(start_index, start_index + size):
                fn(*pool[i % len(pool)])
            _sync(device)
            per_call[side].append((time.perf_counter() - start) / size)
        start_index += size
    return (statistics.median(per_call["base"]) * batches, statistics.median(per_call["ours"]) * batches)


@contextlib.contextmanager
def _quiet_stderr():
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
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr():
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


def _relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """max over tensors of ‖a − b‖ / ‖b‖ (‖a − b‖ where b = 0)."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        a, b = a.detach().double(), b.detach().double()
        denom = float(b.norm())
        worst = max(worst, float((a - b).norm()) / denom if denom > 0 else float((a - b).norm()))
    return worst


# --------------------------------------------------------------------------- one case


class _Setup:
    """A case's recipe, network, data and the two training steps, each on its own copy of the weights."""

    def __init__(self, case: Case, options: BenchOptions, device: torch.device, dtype: torch.dtype):
        self.case, self.device, self.dtype = case, device, dtype
        recipe = case_recipe(case, options.overrides)
        kind = recipe.rule.kind
        if kind not in BASELINES:
            raise EprunError(f"bench {case.name}: no baseline for rule {kind!r} "
                             f"(baselines: {', '.join(BASELINES)})")
        if getattr(recipe.rule, "estimator", "one-sided") == "random-sign":
            raise EprunError(f"bench {case.name}: the baseline cannot share eprun's random-sign draws; "
                             f"use -s rule.estimator=one-sided")
        self.recipe = recipe
        self.info = dataset_info(recipe.data.dataset)
        try:
            self.pristine = build_network(recipe, self.info.input_shape, self.info.num_classes, device, dtype)
        except ValueError as exc:
            raise EprunError(f"bench {case.name}: {exc}") from None
        if kind in PHI_RULES and not baseline.supports(self.pristine):
            raise EprunError(f"bench {case.name}: no autograd-of-Φ baseline for model.kind "
                             f"{recipe.model.kind!r} (it has no Φ)")
        self.baseline = BASELINES[kind]
        self.batch = recipe.data.batch_size
        self.eval_batch = recipe.data.eval_batch_size if case.eval_test else self.batch

    def data(self, n_batches: int, batch: int, purpose: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Random inputs in [0, 1) of the dataset's shape and random labels, seeded, on the device."""
        g = generator(self.recipe.seed, f"bench-{purpose}")
        pool = []
        for _ in range(n_batches):
            x = torch.rand(batch, *self.info.input_shape, generator=g).to(self.device, self.dtype)
            y = torch.randint(0, self.info.num_classes, (batch,), generator=g).to(self.device)
            pool.append((x, y))
        return pool

    def _copy(self, dtype: torch.dtype | None = None):
        net = copy.deepcopy(self.pristine)
        return net if dtype is None else net.to(dtype)

    def eprun_side(self, dtype: torch.dtype | None = None):
        """(net, rule, training step fn(x, y) with the optimiser step) on a fresh copy of the weights."""
        net = self._copy(dtype)
        rule = build_rule(self.recipe, net)
        optimizer = build_optimizer(self.recipe.optim, net.layer_groups())
        stepping = getattr(rule, "steps_optimizer", False)
        if hasattr(rule, "attach_optimizer"):
            rule.attach_optimizer(optimizer)

        def train(x, y):
            if not stepping:
                optimizer.zero_grad(set_to_none=False)
            rule.train_step(x, y)
            if not stepping:
                optimizer.step()

        return net, rule, train

    def baseline_side(self, dtype: torch.dtype | None = None, optimizer: bool = True):
        """(net, training step fn(x, y)) on a fresh copy of the weights; with ``optimizer=False``
        the step leaves its update in ``.grad`` and applies nothing."""
        net = self._copy(dtype)
        opt = _plain_optimizer(self.recipe.optim, net.layer_groups()) if optimizer else _NoStep()
        return net, self.baseline.train(net, self.recipe.rule, opt)

    def update_difference(self, x, y, dtype: torch.dtype | None = None) -> float:
        """Largest relative difference between eprun's update and the baseline's, from the same
        weights on the same batch (in ``dtype`` if given): ``.grad`` before any optimiser step, or,
        for a rule that steps the optimiser itself (C-EP), the parameters' change over the step."""
        if dtype is not None:
            x = x.to(dtype)
        ours, rule, train = self.eprun_side(dtype)
        if getattr(rule, "steps_optimizer", False):
            theirs, base_train = self.baseline_side(dtype)
            start = [p.detach().clone() for p in ours.parameters()]
            train(x, y)
            base_train(x, y)
            return _relative_difference([p.detach() - s for p, s in zip(ours.parameters(), start)],
                                        [p.detach() - s for p, s in zip(theirs.parameters(), start)])
        theirs, base_update = self.baseline_side(dtype, optimizer=False)
        ours.zero_grad(set_to_none=False)
        rule.train_step(x, y)
        base_update(x, y)
        pairs = [(_grad(p), _grad(q)) for p, q in zip(ours.parameters(), theirs.parameters())
                 if p.grad is not None or q.grad is not None]  # one side's update missing: compared with 0
        return _relative_difference([a for a, _ in pairs], [b for _, b in pairs])

    def prediction_difference(self, x, y) -> float:
        """Largest relative difference between the free phase's predictions, from the same weights."""
        _, rule, _ = self.eprun_side()
        with torch.no_grad():
            ours = rule.evaluate(x, y)[0]
        return _relative_difference([ours], [self.baseline.predict(self._copy(), self.recipe.rule)(x)])


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


class _NoStep:
    """An optimiser that applies nothing: the baseline's update stays in ``.grad`` to be compared."""

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def _device_index(device: torch.device) -> int:
    return 1 if device.type == "cuda" else 0


def _numbers(case: Case, options: BenchOptions, device: torch.device) -> tuple[int, int, int]:
    """(timed training batches, timed evaluation batches, warm-up batches) for this case."""
    i = _device_index(device)
    batches, eval_batches, warmup = case.batches[i], case.eval_batches[i], case.warmup[i]
    if options.quick:
        batches, eval_batches, warmup = 1, 1, min(warmup, 1)
    if options.batches is not None:
        batches = eval_batches = options.batches
    if options.warmup is not None:
        warmup = options.warmup
    return batches, eval_batches, warmup


def _common(setup: _Setup, net, threads: int) -> dict:
    r = setup.recipe
    return {"case": setup.case.name, "about": setup.case.about,
            "recipe": setup.case.recipe + (" (rule replaced)" if setup.case.rule else ""),
            "net": describe(net), "rule": r.rule.kind, "T": getattr(r.rule, "T", None), "K": getattr(r.rule, "K", None),
            "beta": getattr(r.rule, "beta", None), "optimizer": r.optim.kind,
            "device": str(setup.device), "dtype": str(setup.dtype).replace("torch.", ""), "threads": threads}


def run_train_case(case: Case, options: BenchOptions, device, dtype, log=print) -> dict:
    setup = _Setup(case, options, device, dtype)
    batches, eval_batches, warmup = _numbers(case, options, device)
    pool = setup.data(min(batches + warmup, 4), setup.batch, "train")
    n64 = min(setup.batch, CHECK64_EXAMPLES)
    if setup.baseline.same_update:
        log(f"{case.name}: same update from eprun and the baseline?")
        update_diff = setup.update_difference(*pool[0])
        eval_diff = setup.prediction_difference(*pool[0])
        update_diff64 = setup.update_difference(pool[0][0][:n64], pool[0][1][:n64], torch.float64)
    else:  # a different method: nothing to compare but the prediction of the same weights
        update_diff = update_diff64 = None
        eval_diff = setup.prediction_difference(*pool[0])

    ours, rule, train = setup.eprun_side()
    theirs, base_train = setup.baseline_side()
    log(f"{case.name}: training, {warmup} warm-up + {batches} timed batches each")
    t_base, t_ours = _timed_pair(base_train, train, pool, batches, warmup, device)

    def evaluate(x, y):
        with torch.no_grad():
            rule.evaluate(x, y)

    base_predict = setup.baseline.predict(theirs, setup.recipe.rule)

    def base_evaluate(x, y):
        base_predict(x)

    log(f"{case.name}: evaluation, {warmup} warm-up + {eval_batches} timed batches each")
    t_base_eval, t_ours_eval = _timed_pair(base_evaluate, evaluate, pool, eval_batches, warmup, device)

    log(f"{case.name}: peak memory")
    x, y = pool[0]
    memory = {"train_peak_bytes_eprun": peak_memory(lambda: train(x, y), device),
              "train_peak_bytes_baseline": peak_memory(lambda: base_train(x, y), device),
              "eval_peak_bytes_eprun": peak_memory(lambda: evaluate(x, y), device),
              "eval_peak_bytes_baseline": peak_memory(lambda: base_evaluate(x, y), device)}

    b = setup.batch
    train_flop = _flop(train_macs, ours, setup.recipe.rule, b)
    eval_flop = _flop(eval_macs, ours, setup.recipe.rule, b)
    train_gflops = None if train_flop is None else train_flop * batches / t_ours / 1e9
    eval_gflops = None if eval_flop is None else eval_flop * eval_batches / t_ours_eval / 1e9
    return {
        **_common(setup, ours, torch.get_num_threads()), "kind": "train",
        "batch": b, "eval_batch": b, "batches": batches, "eval_batches": eval_batches, "warmup": warmup,
        "max_relative_update_difference": update_diff, "max_relative_eval_difference": eval_diff,
        "max_relative_update_difference_float64": update_diff64, "float64_check_examples": n64,
        "train_eprun_samples_per_s": batches * b / t_ours,
        "train_baseline_samples_per_s": batches * b / t_base,
        "train_ratio": t_base / t_ours,
        "eval_eprun_samples_per_s": eval_batches * b / t_ours_eval,
        "eval_baseline_samples_per_s": eval_batches * b / t_base_eval,
        "eval_ratio": t_base_eval / t_ours_eval,
        **memory,
        "memory_method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD,
        "train_gflop_per_batch": None if train_flop is None else train_flop / 1e9,
        "eval_gflop_per_batch": None if eval_flop is None else eval_flop / 1e9,
        "train_gflop_per_s": train_gflops, "eval_gflop_per_s": eval_gflops,
        "relax_engine": getattr(ours, "last_relax_engine", None),
    }


def run_eval_test_case(case: Case, options: BenchOptions, device, dtype, log=print) -> dict:
    """Evaluation of a whole test set (random data): seconds, eprun and baseline."""
    setup = _Setup(case, options, device, dtype)
    eb = setup.eval_batch
    n_images = eb if options.quick else EVAL_TEST_IMAGES
    n_images = n_images if options.batches is None else min(n_images, options.batches * eb)
    _, _, warmup = _numbers(case, options, device)
    pool = setup.data(math.ceil(n_images / eb), eb, "test")
    pool[-1] = tuple(t[: n_images - eb * (len(pool) - 1)] for t in pool[-1])
    eval_diff = setup.prediction_difference(pool[0][0][: setup.batch], pool[0][1][: setup.batch])
    ours, rule, _ = setup.eprun_side()
    theirs = copy.deepcopy(setup.pristine)

    def evaluate(x, y):
        with torch.no_grad():
            rule.evaluate(x, y)

    log(f"{case.name}: {n_images:,} images in batches of {eb}, eprun and the baseline")
    base_predict = setup.baseline.predict(theirs, setup.recipe.rule)
    rounds = 1 if options.quick else EVAL_TEST_ROUNDS  # whole passes, alternating; the median of each side
    times = [(_timed(lambda x, y: base_predict(x), pool, len(pool), warmup if r == 0 else 0, device),
              _timed(evaluate, pool, len(pool), warmup if r == 0 else 0, device)) for r in range(rounds)]
    t_base = statistics.median(t for t, _ in times)
    t_ours = statistics.median(t for _, t in times)
    flops = [_flop(eval_macs, ours, setup.recipe.rule, len(x)) for x, _ in pool]
    gflops = None if None in flops else sum(flops) / t_ours / 1e9
    return {
        **_common(setup, ours, torch.get_num_threads()), "kind": "eval-test",
        "eval_batch": eb, "n_images": n_images, "warmup": warmup,
        "eprun_seconds": t_ours, "baseline_seconds": t_base, "ratio": t_base / t_ours, "rounds": rounds,
        "max_relative_eval_difference": eval_diff,
        "eval_gflop_per_s": gflops,
        "relax_engine": getattr(ours, "last_relax_engine", None),
    }


def run(options: BenchOptions, log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Run the selected cases; return their results and the default cases left out.

    The machine's peak is measured before the first case and after the last, and the higher
    of the two is kept: a product timed while another process held the core reads low.
    """
    cases, skipped, device, dtype = resolve(options)
    size, reps = (1024, 10) if options.quick else (None, 5)
    log(f"measuring the machine's matmul throughput on {device} ({options.dtype})")
    peak = measure_peak(device, dtype, size, reps)
    results = []
    for case in cases:
        fn = run_eval_test_case if case.eval_test else run_train_case
        results.append(fn(case, options, device, dtype, log))
    if results:
        again = measure_peak(device, dtype, size, reps)
        if again["peak_gflop_per_s"] > peak["peak_gflop_per_s"]:
            peak = again
    for r in results:
        r.update(peak)
        for phase in ("train", "eval"):
            if f"{phase}_gflop_per_s" in r:
                gflops = r[f"{phase}_gflop_per_s"]
                r[f"{phase}_fraction_of_peak"] = None if gflops is None else gflops / peak["peak_gflop_per_s"]
    return results, skipped


# --------------------------------------------------------------------------- the table


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:,.1f}"


def _gflops(r: dict, phase: str) -> str:
    gflops, fraction = r.get(f"{phase}_gflop_per_s"), r.get(f"{phase}_fraction_of_peak")
    return "-" if gflops is None else f"{gflops:,.1f} ({100 * fraction:.0f}%)"


def table(results: list[dict]):
    """The training cases as a rich table, and one line per evaluation-test case."""
    from rich.table import Table

    t = Table(show_header=True, header_style="bold", title="eprun against the autograd-of-Φ baseline")
    for col in ("case", "net", "rule", "T/K", "batch", "train/s eprun · base", "×", "eval/s eprun · base", "×",
                "MiB train eprun · base", "MiB eval eprun · base", "GFLOP/s (peak)", "Δupdate f32 · f64"):
        t.add_column(col, justify="left" if col in ("case", "net", "rule") else "right")
    lines = []
    for r in results:
        if r["kind"] == "eval-test":
            lines.append(f"{r['case']}: {r['n_images']:,} images (batches of {r['eval_batch']}, T={r['T']}) in "
                         f"{r['eprun_seconds']:.3f} s; baseline {r['baseline_seconds']:.3f} s, "
                         f"×{r['ratio']:.1f}; eprun GFLOP/s (of peak) {_gflops(r, 'eval')}; "
                         f"prediction rel. diff {r['max_relative_eval_difference']:.1e}")
            continue
        tk = "/".join(str(r[k]) for k in ("T", "K") if r[k] is not None) or "-"
        t.add_row(r["case"], r["net"], r["rule"], tk, str(r["batch"]),
                  f"{r['train_eprun_samples_per_s']:,.0f} · {r['train_baseline_samples_per_s']:,.0f}",
                  f"{r['train_ratio']:.1f}",
                  f"{r['eval_eprun_samples_per_s']:,.0f} · {r['eval_baseline_samples_per_s']:,.0f}",
                  f"{r['eval_ratio']:.1f}",
                  f"{_mib(r['train_peak_bytes_eprun'])} · {_mib(r['train_peak_bytes_baseline'])}",
                  f"{_mib(r['eval_peak_bytes_eprun'])} · {_mib(r['eval_peak_bytes_baseline'])}",
                  _gflops(r, "train"),
                  "n/a (vs BP)" if r["max_relative_update_difference"] is None else
                  f"{r['max_relative_update_difference']:.0e} · {r['max_relative_update_difference_float64']:.0e}")
    return t, lines


def footnotes(results: list[dict], skipped: list[str]) -> list[str]:
    notes = []
    if results:
        r = results[0]
        notes.append(f"device {r['device']}, {r['dtype']}, {r['threads']} thread(s); machine peak "
                     f"{r['peak_gflop_per_s']:,.1f} GFLOP/s ({r['peak_method']})")
        train = [x for x in results if x["kind"] == "train"]
        if train:
            notes.append(f"samples/s over {', '.join(str(n) for n in sorted({x['batches'] for x in train}))} timed "
                         f"batch(es) after warm-up, in up to 5 rounds alternating baseline and eprun, each side "
                         f"its median round; × = baseline time / eprun time; evaluation = free phase "
                         f"at the training batch size")
            notes.append(f"memory: {train[0]['memory_method']}")
            notes.append("GFLOP/s: 2 × multiply-adds of eprun's step counted from the shapes for T and K steps "
                         "(eprun.bench.train_macs) over its measured time; peak = the matmul above; a phase that "
                         "stops early (tol; the compiled kernel at a bitwise fixed point) computes fewer, and so "
                         "do the compiled kernels of a max-pooled conv layer (the top-down term from its "
                         "nonzeros only: a quarter of the transposed convolution with 2×2 pools; a 5×5 "
                         "convolution by Winograd's F(4×4, 5×5): about a fifth of the direct multiply-adds), "
                         "so a conv net can read over 100%")
            notes.append(f"Δupdate: max over parameters of ‖u_eprun − u_base‖ / ‖u_base‖ from the same weights, "
                         f"on the first batch in {r['dtype']} · on its first {train[0]['float64_check_examples']} "
                         f"examples in float64; EB = energy-based")
        engines = {x["case"]: x.get("relax_engine") for x in results if x.get("relax_engine")}
        if engines:
            from eprun import native

            state = native.status()
            vectors = ", AVX-512 one pass for one hidden layer, AVX2" if state["avx512"] else ", AVX2"
            built = "compiled" + (vectors if state["vectorized"] else ", scalar") \
                + (", split on torch's OpenMP threads" if state["openmp"] else "") if state["available"] \
                else f"unavailable: {state['reason']}"
            notes.append("relaxation engine (eprun.native, " + built + "; EPRUN_NATIVE=0 for torch only; "
                         "torch+native: the max-pooled top-down term and, where it applies, the 5×5 convolution and "
                         "its max pooling compiled, torch for the rest): "
                         + ", ".join(f"{case} {engine}" for case, engine in engines.items()))
        if r["device"].startswith("cuda") and torch.backends.cudnn.allow_tf32:
            notes.append("CUDA: cuDNN convolutions may use TF32 (torch's default), the peak matmul does not")
    for s in skipped:
        notes.append(f"skipped {s}")
    return notes
