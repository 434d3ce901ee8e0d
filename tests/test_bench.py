"""``eprun bench`` and its autograd-of-Φ baselines: the baselines compute eprun's updates (float64),
and a quick run through the CLI gives the documented JSON. No timing is asserted."""

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from eprun.bench.cost import eval_macs, train_macs
from eprun.cli import app
from eprun.nets.conv import ConvConfig, ConvNet
from eprun.nets.energy_mlp import EnergyMLP, EnergyMLPConfig
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.optim import build_optimizer
from eprun.recipe import OptimConfig
from eprun.rules.bptt import BPTT, BPTTConfig
from eprun.rules.cep import CEP, CEPConfig
from eprun.reference import autograd_ep as baseline
from eprun.reference import for_net
from eprun.rules.ep import EP, EPConfig

TOL = 1e-6


def mlp(hidden, readout="mse", nudge="pre_activation"):
    return PrototypicalMLP(MLPConfig(hidden=list(hidden), readout=readout, nudge=nudge), (1, 5, 5), 4,
                           torch.Generator().manual_seed(0)).double()


def energy_mlp(hidden, **kw):
    return EnergyMLP(EnergyMLPConfig(hidden=list(hidden), **kw), (1, 5, 5), 4, torch.Generator().manual_seed(0)).double()


def conv_net(**kw):
    cfg = ConvConfig(channels=[3, 4], kernels=3, fc=[4], **kw)
    return ConvNet(cfg, (1, 10, 10), 4, torch.Generator().manual_seed(0)).double()


def batch(net, n=6):
    g = torch.Generator().manual_seed(1)
    shape = net.input_shape if isinstance(net, ConvNet) else (1, 5, 5)
    return torch.rand(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def rel(ours, theirs):
    return max(float((a - b).norm() / b.norm()) for a, b in zip(ours, theirs))


def grads(net):
    return [p.grad.clone() for p in net.parameters()]


def vf_mlp(hidden, same_update=False, nudge="pre_activation"):
    from eprun.nets.vf_mlp import VectorFieldMLP, VFMLPConfig

    cfg = VFMLPConfig(hidden=list(hidden), initial_angle=30.0, same_update=same_update, nudge=nudge)
    return VectorFieldMLP(cfg, (1, 5, 5), 4, torch.Generator().manual_seed(0)).double()


NETS = {
    "mlp-1h": lambda: mlp([7]),
    "mlp-2h": lambda: mlp([7, 5]),
    "mlp-2h-softmax": lambda: mlp([7, 5], readout="softmax"),
    "energy-mlp": lambda: energy_mlp([7]),
    "energy-mlp-2h-lateral": lambda: energy_mlp([7, 5], lateral=True),
    "energy-mlp-hard-sigmoid": lambda: energy_mlp([7], activation="hard_sigmoid"),
    "conv": lambda: conv_net(),
    "conv-avg-softmax": lambda: conv_net(pools="avg", readout="softmax", activation="sigmoid"),
    # the authors' nudge after σ (ernoult2019/proto-conv): the reference follows the net's form
    "conv-nudge-after-sigma": lambda: conv_net(activation="hard_sigmoid", nudge="post_activation"),
    "mlp-2h-nudge-after-sigma": lambda: mlp([7, 5], nudge="post_activation"),
    # no Φ: the authors' out-of-place formulation (eprun/reference/vector_field.py), B at 30° from Wᵀ
    "vf-mlp-1h": lambda: vf_mlp([7]),
    "vf-mlp-2h": lambda: vf_mlp([7, 5]),
    "vf-mlp-2h-same-update": lambda: vf_mlp([7, 5], same_update=True),
    "vf-mlp-2h-nudge-after-sigma": lambda: vf_mlp([7, 5], nudge="post_activation"),
}


@pytest.mark.parametrize("name", list(NETS))
def test_ep_baseline_gives_eprun_update_and_prediction(name):
    net = NETS[name]()
    x, y = batch(net)
    twin = copy.deepcopy(net)
    reference = for_net(net)
    rule = EP(EPConfig(T=12, K=5, beta=0.3), net, torch.Generator())
    rule.train_step(x, y)
    reference.ep_train_step(twin, x, y, 12, 5, 0.3)
    assert rel(grads(net), grads(twin)) < TOL
    assert rel([rule.evaluate(x, y)[0]], [reference.predict(twin, x, 12)]) < TOL


def test_symmetric_and_negative_estimators():
    net = mlp([7, 5])
    x, y = batch(net)
    twin = copy.deepcopy(net)
    EP(EPConfig(T=12, K=5, beta=0.3, estimator="symmetric"), net, torch.Generator()).train_step(x, y)
    baseline.ep_train_step(twin, x, y, 12, 5, 0.3, estimator="symmetric")
    assert rel(grads(net), grads(twin)) < TOL
    net.zero_grad(set_to_none=False)
    EP(EPConfig(T=12, K=5, beta=0.3, estimator="negative"), net, torch.Generator()).train_step(x, y)
    baseline.ep_train_step(twin, x, y, 12, 5, 0.3, estimator="negative")
    assert rel(grads(net), grads(twin)) < TOL
    assert baseline.predict(twin, x, 12).shape == (len(x), 4)


@pytest.mark.parametrize("name", ["mlp-1h", "mlp-2h-softmax", "energy-mlp", "conv", "vf-mlp-2h"])
def test_bptt_baseline_gives_eprun_gradient(name):
    net = NETS[name]()
    x, y = batch(net)
    twin = copy.deepcopy(net)
    BPTT(BPTTConfig(T=10), net, torch.Generator()).train_step(x, y)
    for_net(twin).bptt_train_step(twin, x, y, 10)
    assert rel(grads(net), grads(twin)) < TOL


@pytest.mark.parametrize("name", ["mlp-1h", "mlp-2h", "mlp-2h-nudge-after-sigma", "conv", "conv-nudge-after-sigma",
                                  "vf-mlp-2h", "vf-mlp-2h-same-update", "vf-mlp-2h-nudge-after-sigma"])
def test_cep_baseline_gives_eprun_parameter_change(name):
    net = NETS[name]()
    x, y = batch(net)
    twin = copy.deepcopy(net)
    start = [p.detach().clone() for p in net.parameters()]
    lrs = [0.05] * len(net.layer_groups())
    rule = CEP(CEPConfig(T=12, K=5, beta=0.3), net, torch.Generator())
    rule.attach_optimizer(build_optimizer(OptimConfig(kind="sgd", lr=lrs), net.layer_groups()))
    rule.train_step(x, y)
    for_net(twin).cep_train_step(twin, x, y, 12, 5, 0.3, torch.optim.SGD(twin.parameters(), lr=0.05))
    ours = [p.detach() - s for p, s in zip(net.parameters(), start)]
    theirs = [p.detach() - s for p, s in zip(twin.parameters(), start)]
    assert rel(ours, theirs) < TOL


def test_each_net_has_its_reference_formulation():
    from eprun import reference
    from eprun.reference import vector_field

    assert reference.for_net(vf_mlp([7])) is vector_field and reference.for_net(mlp([7])) is baseline
    assert reference.for_net(conv_net()) is baseline and reference.for_net(energy_mlp([7])) is baseline


def test_vector_field_cases_run_through_the_cli_with_their_update_checked():
    tiny = ["-s", "model.hidden=[16]", "-s", "rule.T=4", "-s", "rule.K=2", "-s", "data.batch_size=4",
            "-s", "data.eval_batch_size=8", "-s", "model.initial_angle=30"]
    result = CliRunner().invoke(app, ["--threads", "1", "bench", "--quick", "--device", "cpu", "--json",
                                      "--only", "vf-mlp-1h", "--only", "cvf-mlp-1h", *tiny])
    assert result.exit_code == 0, result.output
    rows = {r["case"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"vf-mlp-1h", "cvf-mlp-1h"}
    for r in rows.values():
        assert r["net"] == "784-16-10 VF" and r["max_relative_update_difference_float64"] < 1e-9
        assert r["train_ratio"] > 0
    refused = CliRunner().invoke(app, ["bench", "--only", "vf-mlp-1h", "-s", "model.readout=softmax", *tiny])
    assert refused.exit_code == 2 and "no reference formulation" in refused.output


def test_multiply_add_counts_of_the_dense_net():
    net = mlp([7, 5])  # 25-7-5-4
    B, T, K = 3, 10, 4
    drive, step = B * 25 * 7, 2 * B * (7 * 5 + 5 * 4)
    assert eval_macs(net, EPConfig(T=T, K=K), B) == drive + T * step
    update = B * 25 * 7 + 2 * B * (7 * 5 + 5 * 4)
    assert train_macs(net, EPConfig(T=T, K=K), B) == drive + (T + K) * step + update
    assert train_macs(net, CEPConfig(T=T, K=K), B) == drive + T * step + K * (drive + step + update)
    assert (train_macs(net, CEPConfig(T=T, K=K), B, follows_input_drive=True)
            == 2 * drive + T * step + K * (step + update - drive))
    assert train_macs(net, BPTTConfig(T=T), B) == 2 * drive + T * 6 * B * (7 * 5 + 5 * 4)


TRAIN_FIELDS = {
    "case", "kind", "net", "rule", "T", "batch", "batches", "warmup", "device", "dtype", "threads",
    "max_relative_update_difference", "max_relative_update_difference_float64", "max_relative_eval_difference",
    "train_eprun_samples_per_s", "train_baseline_samples_per_s", "train_ratio",
    "eval_eprun_samples_per_s", "eval_baseline_samples_per_s", "eval_ratio",
    "train_peak_bytes_eprun", "train_peak_bytes_baseline", "eval_peak_bytes_eprun", "eval_peak_bytes_baseline",
    "memory_method", "train_gflop_per_s", "eval_gflop_per_s", "train_fraction_of_peak", "eval_fraction_of_peak",
    "peak_gflop_per_s", "peak_method",
}


def test_quick_run_through_the_cli_gives_json_with_every_field():
    tiny = ["-s", "model.hidden=[16]", "-s", "rule.T=4", "-s", "rule.K=2", "-s", "data.batch_size=4",
            "-s", "data.eval_batch_size=8"]
    result = CliRunner().invoke(app, ["--threads", "1", "bench", "--quick", "--device", "cpu", "--json",
                                      "--only", "proto-mlp-1h", "--only", "cep-mlp-1h", "--eval-mnist", *tiny])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    by_case = {r["case"]: r for r in rows}
    assert set(by_case) == {"proto-mlp-1h", "cep-mlp-1h", "eval-mlp-1h-test"}
    for name in ("proto-mlp-1h", "cep-mlp-1h"):
        r = by_case[name]
        assert TRAIN_FIELDS <= set(r), TRAIN_FIELDS - set(r)
        assert r["kind"] == "train" and r["batch"] == 4 and r["T"] == 4 and r["net"] == "784-16-10"
        assert r["batches"] == 1 and r["device"] == "cpu" and r["threads"] == 1
        for key in TRAIN_FIELDS:
            if key.endswith(("_per_s", "_ratio", "_of_peak")):
                assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["max_relative_update_difference"] < 1e-3 and r["max_relative_update_difference_float64"] < 1e-9
        assert all(isinstance(r[k], int) and r[k] >= 0 for k in TRAIN_FIELDS if "_bytes_" in k)
    test = by_case["eval-mlp-1h-test"]
    assert test["kind"] == "eval-test" and test["eval_batch"] == 8 and test["n_images"] == 8
    assert test["eprun_seconds"] > 0 and test["baseline_seconds"] > 0 and test["max_relative_eval_difference"] < 1e-4


def test_unknown_case_is_refused_with_the_list():
    result = CliRunner().invoke(app, ["bench", "--only", "nope"])
    assert result.exit_code == 2 and "proto-mlp-1h" in result.output


def test_dtp_case_is_timed_against_bp_on_the_same_net_without_an_update_check():
    tiny = ["-s", "model.channels=[2, 3]", "-s", "data.batch_size=4", "-s", "rule.feedback_iterations=1"]
    result = CliRunner().invoke(app, ["--threads", "1", "bench", "--quick", "--device", "cpu", "--json",
                                      "--only", "dtp-lenet", *tiny])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.stdout)
    assert r["rule"] == "dtp" and r["net"] == "1x28x28 c2-c3-10" and r["batch"] == 4
    assert r["max_relative_update_difference"] is None  # a different method from its reference (BP)
    assert r["max_relative_eval_difference"] == 0.0  # the same forward pass
    assert r["train_eprun_samples_per_s"] > 0 and r["train_baseline_samples_per_s"] > 0
    table = CliRunner().invoke(app, ["--threads", "1", "bench", "--quick", "--device", "cpu",
                                     "--only", "dtp-lenet", *tiny])
    assert table.exit_code == 0 and "vs BP" in table.stdout


needs_compiler = pytest.mark.skipif(__import__("eprun.native.build", fromlist=["compiler"]).compiler() is None,
                                    reason="no C compiler on this machine")


@needs_compiler
def test_native_step_script_times_each_build_and_compares_states(capsys):
    """benchmarks/native_step.py builds each source it is given and gives ns per example-step and
    the states' difference from the first build (0 for a build against itself, and for a build
    that only renames a macro the source does not use)."""
    from benchmarks import native_step
    from eprun.native import build

    source = str(build.SOURCES[0])
    results = native_step.main([source, f"{source}:UNUSED_MACRO=1", "--steps", "3", "--rounds", "1"])
    assert list(results) == [source, f"{source}:UNUSED_MACRO=1"]
    for r in results.values():
        assert r["ns_per_example_step"] > 0 and r["max_abs_difference"] == 0.0


def test_conv_step_script_times_both_paths_and_the_parts(monkeypatch):
    """benchmarks/conv_step.py relaxes the MNIST conv net on both paths and times a step's parts,
    leaving EPRUN_NATIVE as it found it."""
    from benchmarks import conv_step
    from eprun import native

    monkeypatch.delenv("EPRUN_NATIVE", raising=False)
    try:
        result = conv_step.main(["--threads", "1", "--batch", "2", "--steps", "2", "--rounds", "1"])
    finally:
        native.reset()
    assert set(result["relax_ms_per_step"]) == {"compiled", "torch"}
    assert all(ms > 0 for ms in result["relax_ms_per_step"].values()) and result["ratio"] > 0
    parts = result["parts_ms"]
    derived = "max pool with indices (channels-last z)"  # a difference of two timings: either sign under load
    assert len(parts) >= 4 and derived in parts and all(ms > 0 for name, ms in parts.items() if name != derived)
    assert ("z and its max pool, compiled Winograd" in parts) == native.conv.winograd_conv_pool_available(
        5, 1, 2, (8, 8), 32, 64)
    assert "EPRUN_NATIVE" not in __import__("os").environ


def test_precision_script_compares_every_precision_with_float64():
    """benchmarks/precision.py: EP's update in float32 (both engines), float32 with matmul
    precision "medium" and bfloat16 against float64, for every parameter, plus the BPTT scale row;
    float32 lands within rounding of float64."""
    from benchmarks import precision

    results = precision.main(["--batches", "2"])
    assert set(results) == {"float32, compiled kernels", "float32, torch", "float32, matmul precision medium",
                            "bfloat16", "BPTT gradient, float64 (scale)"}
    for row in results.values():
        assert set(row) == {"W0", "b0", "W1", "b1"}
    for label in ("float32, compiled kernels", "float32, torch"):
        assert max(cell["relative_error"] for cell in results[label].values()) < 1e-2
        assert min(cell["cosine"] for cell in results[label].values()) > 0.999


def test_precision_policy_script_measures_each_setting_on_the_cpu():
    """benchmarks/precision_cuda.py on the CPU: float32 and bf16 (no TF32 there) against float64,
    per parameter; float32 within rounding, bf16 off float32 by its products' rounding only, and
    the precision left at float32."""
    from benchmarks import precision_cuda
    from eprun import precision

    results = precision_cuda.main(["--device", "cpu", "--batch", "4", "--batches", "0",
                                   "--recipe", "ernoult2019/proto-mlp-1h-adam"])
    rows = results["ernoult2019/proto-mlp-1h-adam"]
    assert set(rows) == {"float32", "bf16"} and precision.relax_dtype() is None
    assert rows["float32"]["worst_relative_error"] < 1e-4 and rows["float32"]["samples_per_s"] is None
    assert 1e-4 < rows["bf16"]["worst_relative_error"] < 0.1 and rows["bf16"]["worst_cosine"] > 0.99
    assert len(rows["bf16"]["cosine_per_parameter"]) == 4


@needs_compiler
def test_engines_script_times_torch_and_every_build_the_cpu_runs(monkeypatch):
    """benchmarks/engines.py: the free phase on torch and on each build this CPU can run, per
    batch and thread count, each build's states within float32 rounding of torch's; it leaves
    EPRUN_NATIVE and the thread count as it found them."""
    from benchmarks import engines
    from eprun.native import build

    monkeypatch.delenv("EPRUN_NATIVE", raising=False)
    threads = torch.get_num_threads()
    result = engines.main(["--batches", "4", "--rounds", "1"])
    assert torch.get_num_threads() == threads and "EPRUN_NATIVE" not in __import__("os").environ
    names = {key.split(", ")[-1] for key in result["engines"]}
    assert "torch" in names and "generic" in names
    assert ("avx2" in names) == ("avx2" in build.cpu_flags())
    for figures in result["engines"].values():
        assert figures["us_per_step"] > 0 and figures["max_abs_difference_from_torch"] < 1e-4


def test_nudge_after_sigma_script_times_torch_and_the_kernel(monkeypatch):
    """benchmarks/nudge_after_sigma.py: a training step of a recipe nudged after σ on torch and on
    the kernel, and nudged inside σ on the kernel, leaving EPRUN_NATIVE and the thread count as
    it found them."""
    from benchmarks import nudge_after_sigma

    monkeypatch.delenv("EPRUN_NATIVE", raising=False)
    threads = torch.get_num_threads()
    result = nudge_after_sigma.main(["--recipe", "ernoult2020/ep-1h", "--rounds", "1"])
    assert torch.get_num_threads() == threads and "EPRUN_NATIVE" not in __import__("os").environ
    times = result["ernoult2020/ep-1h"]
    assert set(times) == {label for label, _, _ in nudge_after_sigma.SETTINGS}
    assert all(len(ms) == 1 and ms[0] > 0 for ms in times.values())


def test_cep_paths_script_times_the_three_paths_and_finds_them_equal():
    """benchmarks/cep_paths.py on a small two-hidden-layer C-EP net: the three nudged-phase paths
    timed, and one batch's updates from the same weights agree to float32 rounding (float64: to
    its rounding)."""
    from benchmarks import cep_paths

    result = cep_paths.main(["--batches", "2", "--rounds", "1", "-s", "model.hidden=[32,16]",
                             "-s", "optim.lr=[0.0056,0.0028,0.001]", "-s", "rule.T=5",
                             "-s", "rule.K=3"])
    assert set(result["samples_per_s"]) == {"recomputed", "input followed", "engine"}
    assert all(rate > 0 for rate in result["samples_per_s"].values())
    assert set(result["relative_difference_of_one_update"]) == {"input followed", "engine"}
    for difference in result["relative_difference_of_one_update"].values():
        assert 0.0 < difference["float32"] < 1e-4  # the paths are distinct code, equal up to rounding
        assert difference["float64"] < 1e-10


def test_target_prop_step_script_times_each_setting_and_puts_the_code_back():
    """benchmarks/target_prop_step.py: a training step of a target propagation recipe before and
    after each CPU path; inside the first setting nets take torch's F.elu and L-DRL's loss applies
    G three times, and everything is as it was afterwards."""
    import torch.nn.functional as F

    from benchmarks import target_prop_step
    from eprun.nets import feedforward
    from eprun.nets.elu import elu
    from eprun.nets.pooling import max_pool_with_indices
    from eprun.rules.dtp import DTP

    difference, loss = feedforward.FeedforwardNet.feedback_difference, DTP.feedback_loss
    with target_prop_step.before_both():
        layer = feedforward.ConvLayer((1, 8, 8), 2, 3, 1, "max", "elu", 1.0, torch.Generator().manual_seed(0))
        assert layer.act is F.elu and feedforward.max_pool_with_indices is not max_pool_with_indices
        assert DTP.feedback_loss is target_prop_step._three_feedbacks_loss
    result = target_prop_step.main(["--recipe", "ernoult2022/mnist-lenet-bp", "--rounds", "1"])
    assert feedforward.FF_ACTIVATIONS["elu"] is elu and feedforward.max_pool_with_indices is max_pool_with_indices
    assert feedforward.FeedforwardNet.feedback_difference is difference and DTP.feedback_loss is loss
    times = result["ernoult2022/mnist-lenet-bp"]
    assert set(times) == set(target_prop_step.SETTINGS)
    assert all(len(ms) == 1 and ms[0] > 0 for ms in times.values())
