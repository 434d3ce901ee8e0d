"""On a CUDA device: the same EP-family updates as the CPU within float32 rounding, C-EP's two
nudged-phase paths equal, the precision policy in force and recorded, a run resumed on CUDA equal
to the run that never stopped, and one rank under torchrun on NCCL equal to a plain run.
Skipped without CUDA; ``scripts/gpu_check.sh`` runs them on a GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from eprun.cli import app
from tests.steps import weight_change

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = math.sqrt(sum(float(((x.double().cpu() - y.double().cpu()) ** 2).sum()) for x, y in zip(a, b)))
    return num / math.sqrt(sum(float((y.double().cpu() ** 2).sum()) for y in b))


def update_on(device: str, kind: str, rule_kind: str = "ep", setting: str = "float32",
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One training step's weight change of a small net of ``kind`` from seed-0 weights on a fixed batch."""
    model = {"mlp": {"kind": "mlp", "hidden": [64]}, "energy_mlp": {"kind": "energy_mlp", "hidden": [64]},
             "vf_mlp": {"kind": "vf_mlp", "hidden": [64], "initial_angle": 20.0},
             "conv": {"kind": "conv", "channels": [8, 16]}}[kind]
    recipe = {"name": "t", "seed": 0, "device": device, "data": {"dataset": "mnist", "batch_size": 20},
              "model": model, "rule": ({"kind": "bptt", "T": 20} if rule_kind == "bptt"
                                       else {"kind": rule_kind, "T": 20, "K": 6, "beta": 0.2}),
              "optim": {"kind": "sgd", "lr": 0.05}}
    return weight_change(recipe, device, 20, 5, setting, dtype)[0]


@pytest.mark.parametrize("kind", ["mlp", "energy_mlp", "vf_mlp"])
def test_bf16_products_on_cuda_keep_the_dense_updates_near_float64(kind):
    """bf16 on the tensor cores: each parameter's update within 5% of float64's on the same GPU
    (the CPU's bf16 measures 4e-4 to 1.6e-2 on such nets, tests/test_bf16_products.py), and not
    float32's (the rounding is there)."""
    exact = update_on("cuda", kind, setting="float32", dtype=torch.float64)
    bf16, f32 = update_on("cuda", kind, setting="bf16"), update_on("cuda", kind)
    for u, r in zip(bf16, exact):
        if float(r.norm()) > 0:
            print(f"bf16 {kind}: {relative([u], [r]):.2e}")
            assert relative([u], [r]) < 0.05
    assert relative(bf16, f32) > 0.0


@pytest.mark.parametrize("kind, rule_kind", [("mlp", "ep"), ("energy_mlp", "ep"), ("vf_mlp", "ep"), ("conv", "ep"),
                                             ("mlp", "cep"), ("vf_mlp", "cep"), ("mlp", "bptt")])
def test_cuda_gives_the_cpu_update_within_float32_rounding(kind, rule_kind):
    cpu, cuda = update_on("cpu", kind, rule_kind), update_on("cuda", kind, rule_kind)
    assert relative(cuda, cpu) < 1e-4


def test_cep_following_the_drive_equals_recomputing_it_on_cuda(monkeypatch):
    from eprun.rules.cep import CEP

    followed = update_on("cuda", "mlp", "cep")
    monkeypatch.setattr(CEP, "follows_input_drive", lambda self: False)
    recomputed = update_on("cuda", "mlp", "cep")
    assert relative(followed, recomputed) < 1e-4


@pytest.mark.parametrize("setting", ["float32", "tf32", "bf16"])
def test_the_precision_policy_is_in_force_and_recorded(setting, tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "-s", "device=cuda", "-s", f"train.precision={setting}",
                    "-s", "train.max_batches=3", "-s", "train.epochs=1", "--out", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    env = json.loads((run / "env.json").read_text())
    on = setting == "tf32"
    assert env["precision"] == {"cuda_matmul_tf32": on, "cudnn_tf32": on, "cuda_bf16_reduced_precision_reduction": False,
                                "relax_products": "bfloat16" if setting == "bf16" else "float32"}
    assert torch.backends.cudnn.allow_tf32 is on and torch.backends.cuda.matmul.allow_tf32 is on


@pytest.mark.parametrize("graphs", ["off", "auto"])
def test_a_run_interrupted_on_cuda_resumes_to_the_uninterrupted_one(graphs, tiny_recipe, tmp_path, monkeypatch,
                                                                    sigterm_on_batch):
    """Bit for bit with eager steps. With steps replayed from graphs the resumed run replays other
    batches than the whole run (a fresh run takes its first steps of each key eagerly): equal to
    float32 rounding, and the gap printed (0 when a replay is the eager step to the bit)."""
    settings = ["-s", "device=cuda", "-s", "train.checkpoint_every=3", "-s", "train.max_batches=10",
                "-s", "train.epochs=2", "-s", "rule.estimator=random-sign", "-s", f"train.cuda_graphs={graphs}"]
    whole = invoke("train", tiny_recipe, "--out", tmp_path / "whole", "-q", *settings)
    assert whole.exit_code == 0, whole.output
    sigterm_on_batch(8)
    stopped = invoke("train", tiny_recipe, "--out", tmp_path / "stopped", "-q", *settings)
    assert stopped.exit_code == 143, stopped.output
    monkeypatch.undo()
    run = next((tmp_path / "stopped").iterdir())
    assert invoke("train", "--resume", run, "-q").exit_code == 0
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(next((tmp_path / "whole").iterdir()) / "checkpoints" / "last.pt", weights_only=True)["model"]
    gap = relative(list(a.values()), list(b.values()))
    print(f"cuda_graphs {graphs}: resumed against whole, relative weight difference {gap:.1e}")
    if graphs == "off":
        for name in b:
            assert torch.equal(a[name], b[name]), name
    else:
        assert gap < 1e-5


def test_one_rank_under_torchrun_on_nccl_equals_a_plain_run(tiny_recipe, tmp_path):
    if not torch.distributed.is_nccl_available():
        pytest.skip("torch built without NCCL")
    settings = ["-s", "device=cuda", "-s", "train.max_batches=6", "-s", "train.epochs=1"]
    env = {**os.environ, "EPRUN_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    outs = []
    for launcher in ([sys.executable, "-m", "eprun"],
                     [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "eprun"]):
        out = tmp_path / str(len(outs))
        proc = subprocess.run([*launcher, "train", str(tiny_recipe), *settings, "--out", str(out), "-q"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(Path(proc.stdout.strip().splitlines()[-1]))
    assert json.loads((outs[1] / "env.json").read_text())["distributed_backend"] == "nccl"
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"] for run in outs)
    for name in b:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- CUDA graphs

MODELS = {"mlp": {"kind": "mlp", "hidden": [64]}, "energy_mlp": {"kind": "energy_mlp", "hidden": [64]},
          "vf_mlp": {"kind": "vf_mlp", "hidden": [64], "initial_angle": 20.0},
          "conv": {"kind": "conv", "channels": [8, 16]}, "vf_conv": {"kind": "vf_conv", "channels": [8, 16]}}


def steps_on_cuda(kind: str, rule: dict, optim: dict, replay: bool, n: int = 8):
    """The parameters after ``n`` training steps on distinct batches, eager or replayed from CUDA
    graphs (:data:`eprun.cuda_graphs.EAGER_STEPS` eager steps per key, then capture and replays),
    and the per-batch scores."""
    from eprun import cuda_graphs, precision
    from eprun.assemble import build_network, build_rule
    from eprun.optim import build_optimizer
    from eprun.recipe import from_plain

    recipe = from_plain({"name": "t", "seed": 0, "device": "cuda", "data": {"dataset": "mnist", "batch_size": 20},
                         "model": MODELS[kind], "rule": rule, "optim": optim})
    dev = torch.device("cuda")
    precision.apply("float32", dev)
    net = build_network(recipe, (1, 28, 28), 10, dev)
    rule_ = build_rule(recipe, net)
    opt = build_optimizer(recipe.optim, net.layer_groups(), capturable=replay)
    rule_.attach_optimizer(opt)
    graphs = cuda_graphs.CapturedTraining(net, rule_, opt, dev) if replay else None
    g = torch.Generator().manual_seed(5)
    scores = []
    for _ in range(n):
        x, y = torch.rand(20, 1, 28, 28, generator=g).to(dev), torch.randint(0, 10, (20,), generator=g).to(dev)
        draw = rule_.prepare_batch()
        if graphs is not None:
            loss_sum, correct = graphs.step(x, y, draw)
        else:
            opt.zero_grad(set_to_none=False)
            logits, loss = rule_.train_step(x, y)
            if not rule_.steps_optimizer:
                opt.step()
            loss_sum, correct = loss.sum().double(), (logits.argmax(dim=1) == y).sum()
        scores.append((float(loss_sum), int(correct)))
    if graphs is not None:
        assert graphs.train.captures >= 1, "nothing was captured"
        assert not graphs.take_non_finite()
    return [p.detach().clone() for p in net.parameters()], scores


SGD, ADAM = {"kind": "sgd", "lr": 0.05, "momentum": 0.5}, {"kind": "adam", "lr": 0.001}
EP_RULE = {"kind": "ep", "T": 20, "K": 6, "beta": 0.2}


@pytest.mark.parametrize("kind, rule, optim", [
    ("mlp", EP_RULE, ADAM), ("mlp", {**EP_RULE, "estimator": "symmetric"}, SGD),
    ("mlp", {**EP_RULE, "estimator": "random-sign"}, ADAM), ("energy_mlp", EP_RULE, SGD),
    ("vf_mlp", EP_RULE, ADAM), ("conv", EP_RULE, SGD), ("vf_conv", EP_RULE, SGD),
    ("mlp", {"kind": "cep", "T": 20, "K": 6, "beta": 0.2}, {"kind": "sgd", "lr": 0.01}),
    ("vf_mlp", {"kind": "cep", "T": 20, "K": 6, "beta": 0.2}, {"kind": "sgd", "lr": 0.01, "momentum": 0.5}),
    ("mlp", {"kind": "bptt", "T": 20}, ADAM)])
def test_steps_replayed_from_cuda_graphs_equal_eager_steps(kind, rule, optim):
    eager, eager_scores = steps_on_cuda(kind, rule, optim, replay=False)
    replayed, replayed_scores = steps_on_cuda(kind, rule, optim, replay=True)
    gap = relative(replayed, eager)
    print(f"{kind} {rule['kind']} {rule.get('estimator', '')}: replayed against eager, relative weight difference "
          f"{gap:.1e}")  # 0 when a replay is the eager step to the bit
    assert gap < 1e-5
    for (a_loss, a_correct), (b_loss, b_correct) in zip(replayed_scores, eager_scores):
        assert abs(a_correct - b_correct) <= 1 and a_loss == pytest.approx(b_loss, rel=1e-4)


def test_a_run_with_cuda_graphs_equals_the_run_without(tiny_recipe, tmp_path):
    settings = ["-s", "device=cuda", "-s", "train.max_batches=12", "-s", "train.epochs=2",
                "-s", "rule.estimator=random-sign", "-s", "train.checkpoint_every=5"]
    runs = {}
    for mode in ("on", "off"):
        result = invoke("train", tiny_recipe, "--out", tmp_path / mode, "-q", *settings, "-s", f"train.cuda_graphs={mode}")
        assert result.exit_code == 0, result.output
        runs[mode] = Path(result.stdout.strip().splitlines()[-1])
    summary = {mode: json.loads((run / "summary.json").read_text()) for mode, run in runs.items()}
    assert summary["on"]["cuda_graphs"]["active"] is True and summary["off"]["cuda_graphs"]["active"] is False
    for key in ("test_accuracy", "train_accuracy", "val_accuracy"):
        assert summary["on"][key] == pytest.approx(summary["off"][key], abs=0.02), key
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"] for run in runs.values())
    gap = relative(list(a.values()), list(b.values()))
    print(f"a run with graphs against one without: relative weight difference {gap:.1e}")
    assert gap < 1e-5


def test_tol_falls_back_with_its_reason_on_cuda(tiny_recipe, tmp_path):
    result = invoke("train", tiny_recipe, "--out", tmp_path, "-q", "-s", "device=cuda", "-s", "rule.tol=0.001",
                    "-s", "train.max_batches=3", "-s", "train.epochs=1")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    record = json.loads((run / "env.json").read_text())["cuda_graphs"]
    assert record["active"] is False and "tol" in record["reason"]


@pytest.mark.parametrize("kind", ["mlp", "vf_mlp"])
def test_the_fused_triton_relaxation_equals_the_torch_path_on_cuda(kind, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("EPRUN_TRITON", "1")
    fused, fused_scores = steps_on_cuda(kind, EP_RULE, SGD, replay=True)
    monkeypatch.setenv("EPRUN_TRITON", "0")
    plain, plain_scores = steps_on_cuda(kind, EP_RULE, SGD, replay=True)
    assert relative(fused, plain) < 1e-5
    assert [c for _, c in fused_scores] == [c for _, c in plain_scores]
