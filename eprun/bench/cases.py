"""What ``eprun bench`` measures: the cases (a bundled recipe at the paper's sizes each), the
options of a run, and the cases and numbers of batches a run takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from eprun import catalog, schema
from eprun.errors import EprunError
from eprun.recipe import Recipe, recipe_from_data


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
         "CIFAR-10 ConvNet 128-256-512-512, T=250 K=30, batch 128, SGD momentum (tens of minutes per batch on CPU)",
         batches=(1, 5), eval_batches=(1, 5), warmup=(0, 2), on_cpu_by_default=False, heavy_on_cpu=True),
    Case("bptt-mlp-1h", "ernoult2019/proto-mlp-1h-adam",
         "784-512-10, BPTT through T=30 steps, batch 50, Adam", batches=(10, 50), eval_batches=(20, 100),
         rule={"kind": "bptt", "T": 30}),
    Case("cep-mlp-1h", "ernoult2020/cep-1h",
         "784-512-10 C-EP, T=40 K=15, batch 20, SGD at every nudged step", batches=(10, 50), eval_batches=(10, 50)),
    Case("eb-mlp-2h", "ernoult2019/eb-mlp-2h",
         "784-512-512-10 energy-based EP, ε=0.2, T=400 K=40, batch 20, SGD", batches=(2, 10), eval_batches=(2, 10),
         warmup=(1, 2), heavy_on_cpu=True),
    Case("cep-mlp-2h", "ernoult2020/cep-2h",
         "784-512-512-10 C-EP, T=100 K=20, batch 20, SGD at every nudged step", batches=(3, 20), eval_batches=(3, 20),
         warmup=(1, 3), heavy_on_cpu=True),
    Case("vf-mlp-1h", "ernoult2020/vf-1h",
         "784-512-10 vector field (VF), T=40 K=15, batch 20, SGD; baseline: the authors' out-of-place steps",
         batches=(10, 50), eval_batches=(10, 50)),
    Case("cvf-mlp-1h", "ernoult2020/cvf-1h",
         "784-512-10 C-VF, T=40 K=15, batch 20, SGD at every nudged step (one-sided: the baseline cannot share "
         "the recipe's random-sign draws)", batches=(10, 50), eval_batches=(10, 50),
         rule={"kind": "cep", "T": 40, "K": 15, "beta": 0.2, "estimator": "one-sided"}),
    Case("vf-mlp-2h", "ernoult2020/vf-2h",
         "784-512-512-10 vector field (VF), T=100 K=20, batch 20, SGD", batches=(3, 20), eval_batches=(3, 20),
         warmup=(1, 3), heavy_on_cpu=True),
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


def numbers(case: Case, options: BenchOptions, device: torch.device) -> tuple[int, int, int]:
    """(timed training batches, timed evaluation batches, warm-up batches) for this case."""
    i = 1 if device.type == "cuda" else 0
    batches, eval_batches, warmup = case.batches[i], case.eval_batches[i], case.warmup[i]
    if options.quick:
        batches, eval_batches, warmup = 1, 1, min(warmup, 1)
    if options.batches is not None:
        batches = eval_batches = options.batches
    if options.warmup is not None:
        warmup = options.warmup
    return batches, eval_batches, warmup


def case_recipe(case: Case, overrides: list[str] = ()) -> Recipe:
    """The case's bundled recipe, its rule section replaced where the case says, then ``overrides``."""
    path = catalog.resolve(case.recipe)
    data, source = schema.read_yaml(path)
    if case.rule is not None:
        data["rule"] = dict(case.rule)
    recipe = recipe_from_data(data, source, list(overrides), default_name=case.name)
    recipe.source = str(path)
    return recipe
