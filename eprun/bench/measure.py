"""One benchmark case measured: eprun's step and evaluation against the baseline's, each on its
own copy of the same weights, on random data of the dataset's shape (seeded, on the device
before any timing).

Per case:

1. **Same update.** From the same weights, on the same batch, eprun's rule and the baseline
   compute the update (``.grad`` for EP and BPTT, the parameter change of the whole step for
   C-EP, whose rule steps the optimiser itself); the largest relative difference over the
   parameters, ‖u_eprun − u_baseline‖ / ‖u_baseline‖, is reported in the benchmark's dtype and,
   on the first few examples, in float64 (:data:`~eprun.bench.cases.CHECK64_EXAMPLES`), and so
   is that of the free phase's prediction.
2. **Training throughput.** Warm-up batches, then the clock around N batches in rounds that
   alternate baseline and eprun (:func:`~eprun.bench.timing.timed_pair`). eprun's step is
   ``rule.train_step`` plus the recipe's optimiser; the baseline's is its autograd step plus
   the same optimiser in torch's default implementation.
3. **Evaluation throughput.** The free phase only (T steps, prediction from s*), at the
   training batch size.
4. **Peak memory** of one training batch and one evaluation batch, for each
   (:func:`~eprun.bench.timing.peak_memory`).
5. **Arithmetic.** Multiply-adds counted from the shapes (:mod:`eprun.bench.cost`) over the
   measured time: GFLOP/s, and its fraction of the machine's matmul throughput.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Callable

import torch

from eprun import cuda_graphs, precision
from eprun.assemble import build_network, build_rule, generator
from eprun.bench.baselines import BASELINES, NoStep, plain_optimizer
from eprun.bench.cases import CHECK64_EXAMPLES, EVAL_TEST_IMAGES, EVAL_TEST_ROUNDS, BenchOptions, Case, case_recipe, numbers, resolve
from eprun.bench.cost import eval_macs, flop, train_macs
from eprun.bench.timing import CPU_MEMORY_METHOD, CUDA_MEMORY_METHOD, measure_peak, peak_memory, timed, timed_pair
from eprun.data import dataset_info
from eprun.errors import EprunError
from eprun.optim import build_optimizer
from eprun import reference


def _relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """max over tensors of ‖a − b‖ / ‖b‖ (‖a − b‖ where b = 0)."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        a, b = a.detach().double(), b.detach().double()
        denom = float(b.norm())
        worst = max(worst, float((a - b).norm()) / denom if denom > 0 else float((a - b).norm()))
    return worst


# --------------------------------------------------------------------------- one case


class CaseSetup:
    """A case's recipe, network, data and the two training steps, each on its own copy of the weights."""

    def __init__(self, case: Case, options: BenchOptions, device: torch.device, dtype: torch.dtype):
        self.case, self.device, self.dtype = case, device, dtype
        recipe = case_recipe(case, options.overrides)
        kind = recipe.rule.kind
        if kind not in BASELINES:
            raise EprunError(f"bench {case.name}: no baseline for rule {kind!r} "
                             f"(baselines: {', '.join(BASELINES)})")
        relaxation = recipe.rule.relaxation()
        if relaxation is not None and relaxation.estimator == "random-sign":
            raise EprunError(f"bench {case.name}: the baseline cannot share eprun's random-sign draws; "
                             f"use -s rule.estimator=one-sided")
        self.recipe = recipe
        precision.apply(recipe.train.precision, device)  # the recipe's, as a run would
        self.info = dataset_info(recipe.data.dataset)
        try:
            self.pristine = build_network(recipe, self.info.input_shape, self.info.num_classes, device, dtype)
        except ValueError as exc:
            raise EprunError(f"bench {case.name}: {exc}") from None
        self.baseline = BASELINES[kind]
        if self.baseline.needs_reference and reference.for_net(self.pristine) is None:
            raise EprunError(f"bench {case.name}: no reference formulation for model.kind {recipe.model.kind!r} "
                             f"with these settings (autograd of Φ: mlp, energy_mlp, conv; vector field: vf_mlp "
                             f"with readout: mse and nudged_update: endpoints)")
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
        stepping = rule.steps_optimizer
        rule.attach_optimizer(optimizer)

        def train(x, y):
            if not stepping:
                optimizer.zero_grad(set_to_none=False)
            rule.train_step(x, y)
            if not stepping:
                optimizer.step()

        return net, rule, train

    def timed_side(self) -> "TimedSide":
        """eprun's training and evaluation steps as timed: replayed from CUDA graphs where the
        recipe's ``train.cuda_graphs`` and the device allow (as in a run), eager otherwise."""
        net = self._copy()
        rule = build_rule(self.recipe, net)
        plan = cuda_graphs.plan(self.recipe.train.cuda_graphs, self.device, rule)
        optimizer = build_optimizer(self.recipe.optim, net.layer_groups(), capturable=plan.active)
        rule.attach_optimizer(optimizer)
        return TimedSide(self.case.name, net, rule, optimizer, plan, self.device)

    def baseline_side(self, dtype: torch.dtype | None = None, optimizer: bool = True):
        """(net, training step fn(x, y)) on a fresh copy of the weights; with ``optimizer=False``
        the step leaves its update in ``.grad`` and applies nothing."""
        net = self._copy(dtype)
        opt = plain_optimizer(self.recipe.optim, net.layer_groups()) if optimizer else NoStep()
        return net, self.baseline.train(net, self.recipe.rule, opt)

    def update_difference(self, x, y, dtype: torch.dtype | None = None) -> float:
        """Largest relative difference between eprun's update and the baseline's, from the same
        weights on the same batch (in ``dtype`` if given): ``.grad`` before any optimiser step, or,
        for a rule that steps the optimiser itself (C-EP), the parameters' change over the step."""
        if dtype is not None:
            x = x.to(dtype)
        ours, rule, train = self.eprun_side(dtype)
        if rule.steps_optimizer:
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


class TimedSide:
    """eprun's timed steps: ``train(x, y)`` (optimiser step included) and ``evaluate(x, y)``,
    replayed from CUDA graphs where ``plan`` is active; a capture that fails under ``auto`` falls
    back to eager steps and :meth:`record` says why, as a run's ``summary.json`` does."""

    def __init__(self, name: str, net, rule, optimizer, plan: cuda_graphs.GraphPlan, device: torch.device):
        self.name, self.net, self.rule, self.optimizer, self.plan = name, net, rule, optimizer, plan
        self.graphs = cuda_graphs.CapturedTraining(net, rule, optimizer, device) if plan.active else None

    def _replayed(self, call) -> bool:
        if self.graphs is None:
            return False
        try:
            call(self.graphs)
            return True
        except cuda_graphs.CaptureFailed as failure:
            if self.plan.mode == "on":
                raise EprunError(f"bench {self.name}: train.cuda_graphs: on, but a step could not be recorded as a "
                                 f"CUDA graph: {failure}") from failure
            self.graphs = None
            self.plan = cuda_graphs.GraphPlan(self.plan.mode, False, f"capture failed: {failure}")
            return False

    def train(self, x, y) -> None:
        draw = self.rule.prepare_batch()
        if self._replayed(lambda graphs: graphs.step(x, y, draw)):
            return
        if not self.rule.steps_optimizer:
            self.optimizer.zero_grad(set_to_none=False)
        self.rule.train_step(x, y)
        if not self.rule.steps_optimizer:
            self.optimizer.step()

    def evaluate(self, x, y) -> None:
        if self._replayed(lambda graphs: graphs.evaluate(x, y)):
            return
        with torch.no_grad():
            self.rule.evaluate(x, y)

    def record(self) -> dict:
        return {**self.plan.record(),
                "captures": 0 if self.graphs is None else self.graphs.train.captures + self.graphs.eval.captures}


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _common(setup: CaseSetup, net, threads: int) -> dict:
    r = setup.recipe
    relaxation = r.rule.relaxation()
    return {"case": setup.case.name, "about": setup.case.about,
            "recipe": setup.case.recipe + (" (rule replaced)" if setup.case.rule else ""),
            "net": net.describe(), "rule": r.rule.kind, "T": relaxation.T if relaxation else None,
            "K": relaxation.K if relaxation else None, "beta": relaxation.beta if relaxation else None,
            "optimizer": r.optim.kind,
            "device": str(setup.device), "dtype": str(setup.dtype).replace("torch.", ""), "threads": threads,
            "precision": r.train.precision if setup.device.type == "cuda" or r.train.precision == "bf16" else None}


def run_train_case(case: Case, options: BenchOptions, device, dtype, log=print) -> dict:
    setup = CaseSetup(case, options, device, dtype)
    batches, eval_batches, warmup = numbers(case, options, device)
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

    timed_side = setup.timed_side()
    ours, rule = timed_side.net, timed_side.rule
    theirs, base_train = setup.baseline_side()
    log(f"{case.name}: training, {warmup} warm-up + {batches} timed batches each")
    t_base, t_ours = timed_pair(base_train, timed_side.train, pool, batches, warmup, device)
    evaluate = timed_side.evaluate
    base_predict = setup.baseline.predict(theirs, setup.recipe.rule)

    def base_evaluate(x, y):
        base_predict(x)

    log(f"{case.name}: evaluation, {warmup} warm-up + {eval_batches} timed batches each")
    t_base_eval, t_ours_eval = timed_pair(base_evaluate, evaluate, pool, eval_batches, warmup, device)

    log(f"{case.name}: peak memory")
    x, y = pool[0]
    _, eager_rule, train = setup.eprun_side()  # eager steps: a graph's memory is allocated once, at its capture

    def eager_evaluate(x, y):
        with torch.no_grad():
            eager_rule.evaluate(x, y)

    memory = {"train_peak_bytes_eprun": peak_memory(lambda: train(x, y), device),
              "train_peak_bytes_baseline": peak_memory(lambda: base_train(x, y), device),
              "eval_peak_bytes_eprun": peak_memory(lambda: eager_evaluate(x, y), device),
              "eval_peak_bytes_baseline": peak_memory(lambda: base_evaluate(x, y), device)}

    b = setup.batch
    followed = setup.recipe.rule.kind == "cep" and rule.follows_input_drive()  # kind cep: a CEP rule
    train_flop = flop(train_macs, ours, setup.recipe.rule, b, follows_input_drive=followed)
    eval_flop = flop(eval_macs, ours, setup.recipe.rule, b)
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
        "relax_engine": ours.last_relax_engine if ours.has_dynamics else None,
        "cuda_graphs": timed_side.record(),
    }


def run_eval_test_case(case: Case, options: BenchOptions, device, dtype, log=print) -> dict:
    """Evaluation of a whole test set (random data): seconds, eprun and baseline."""
    setup = CaseSetup(case, options, device, dtype)
    eb = setup.eval_batch
    n_images = eb if options.quick else EVAL_TEST_IMAGES
    n_images = n_images if options.batches is None else min(n_images, options.batches * eb)
    _, _, warmup = numbers(case, options, device)
    pool = setup.data(math.ceil(n_images / eb), eb, "test")
    pool[-1] = tuple(t[: n_images - eb * (len(pool) - 1)] for t in pool[-1])
    eval_diff = setup.prediction_difference(pool[0][0][: setup.batch], pool[0][1][: setup.batch])
    timed_side = setup.timed_side()
    ours, evaluate = timed_side.net, timed_side.evaluate
    theirs = copy.deepcopy(setup.pristine)

    log(f"{case.name}: {n_images:,} images in batches of {eb}, eprun and the baseline")
    base_predict = setup.baseline.predict(theirs, setup.recipe.rule)
    rounds = 1 if options.quick else EVAL_TEST_ROUNDS  # whole passes, alternating; the median of each side
    times = [(timed(lambda x, y: base_predict(x), pool, len(pool), warmup if r == 0 else 0, device),
              timed(evaluate, pool, len(pool), warmup if r == 0 else 0, device)) for r in range(rounds)]
    t_base = statistics.median(t for t, _ in times)
    t_ours = statistics.median(t for _, t in times)
    flops = [flop(eval_macs, ours, setup.recipe.rule, len(x)) for x, _ in pool]
    gflops = None if None in flops else sum(flops) / t_ours / 1e9
    return {
        **_common(setup, ours, torch.get_num_threads()), "kind": "eval-test",
        "eval_batch": eb, "n_images": n_images, "warmup": warmup,
        "eprun_seconds": t_ours, "baseline_seconds": t_base, "ratio": t_base / t_ours, "rounds": rounds,
        "max_relative_eval_difference": eval_diff,
        "eval_gflop_per_s": gflops,
        "relax_engine": ours.last_relax_engine if ours.has_dynamics else None,
        "cuda_graphs": timed_side.record(),
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
