"""Target propagation: feedback nets, L-DRL / DRL / vanilla DTP / TP against BP, alignment
metrics, recipes, resume."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from eprun.cli import app
from eprun.nets.feedforward import FeedforwardConvNet, FeedforwardMLP, FFConvConfig, FFMLPConfig
from eprun.rules.dtp import (DRL, DTP, TP, DRLConfig, DTPConfig, TPConfig, VanillaDTP, VanillaDTPConfig,
                             angle_degrees)

runner = CliRunner()


def mlp(hidden=(12, 12), activation="elu", inputs=10, classes=5, seed=0):
    net = FeedforwardMLP(FFMLPConfig(hidden=list(hidden), activation=activation), (inputs,), classes,
                         torch.Generator().manual_seed(seed))
    return net.double()


def conv(activation="elu", channels=(3, 4), pools="max", fc=(), seed=0, shape=(2, 9, 11)):
    cfg = FFConvConfig(channels=list(channels), kernels=3, paddings=1, pools=pools, fc=list(fc), activation=activation)
    return FeedforwardConvNet(cfg, shape, 4, torch.Generator().manual_seed(seed)).double()


def batch(shape, classes, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def set_feedback_to_transpose(net):
    """V_l = W_lᵀ for every feedback layer (the transposed conv takes W's own layout)."""
    with torch.no_grad():
        for layer in net.layers[1:]:
            w = layer.weight
            layer.feedback_weight.copy_(w.T if w.dim() == 2 else w)
            layer.feedback_bias.zero_()


# ----------------------------------------------------------------------------- feedback nets


@pytest.mark.parametrize("make", [lambda: mlp(), lambda: conv(), lambda: conv(fc=(7,)), lambda: conv(pools="none")])
def test_feedback_layers_invert_the_forward_shapes(make):
    net = make()
    x, _ = batch(net.layers[0].in_shape, 4, n=3)
    hs, indices = net.forward_all(x)
    assert len(hs) == net.depth + 1
    for l in range(2, net.depth + 1):
        assert net.feedback(l, hs[l], indices[l - 1]).shape == hs[l - 1].shape


def test_feedback_unpools_at_the_forward_pass_indices():
    """With 1×1 kernels, identity σ, V = I and c = 0, G(h) is the max-unpooling of h: the
    pooled values land exactly at the argmax positions of the forward pass, zeros elsewhere
    (odd sizes included)."""
    cfg = FFConvConfig(channels=[2, 2], kernels=1, paddings=0, pools="max", activation="identity")
    net = FeedforwardConvNet(cfg, (2, 7, 9), 3, torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        net.layers[1].feedback_weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        net.layers[1].feedback_bias.zero_()
    x, _ = batch((2, 7, 9), 3, n=2)
    hs, indices = net.forward_all(x)
    z = F.conv2d(hs[1], net.layers[1].weight, net.layers[1].bias)  # layer 2's conv output, before pooling
    r = net.feedback(2, hs[2], indices[1])
    pooled, where = F.max_pool2d(z, 2, 2, return_indices=True)
    assert torch.equal(where, indices[1])
    expected = torch.zeros_like(z).flatten(2).scatter_(2, where.flatten(2), pooled.flatten(2)).view_as(z)
    assert torch.allclose(r, expected)
    assert int((r != 0).sum()) == pooled.numel()


def test_forward_init_does_not_depend_on_the_feedback_path():
    """Forward weights are drawn first: an MLP and its deeper-feedback twin share W_1."""
    a, b = mlp(hidden=(12, 12)), mlp(hidden=(12, 12))
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.weight, lb.weight)
    assert a.feedback_groups()[0][0].shape == (12, 12)


# ----------------------------------------------------------------------------- targets and updates


def dtp_update(rule, x, y):
    rule.net.zero_grad(set_to_none=False)
    for group in rule.net.layer_groups():
        for p in group:
            p.grad = torch.zeros_like(p)
    rule.train_step(x, y)
    return rule.alignment(x, y, seed=0)


def test_output_layer_update_is_bp_gradient_for_any_beta():
    net = mlp()
    x, y = batch((10,), 5)
    rule = DTP(DTPConfig(beta=0.9, feedback_iterations=0), net, torch.Generator().manual_seed(0))
    metrics = dtp_update(rule, x, y)
    assert metrics["update_angle_deg/layer3"] < 1e-5
    assert metrics["update_distance/layer3"] < 1e-10


@pytest.mark.parametrize("make,shape", [(lambda: mlp(hidden=(9, 8, 7), activation="leaky_relu"), (10,)),
                                        (lambda: conv(activation="leaky_relu", fc=(6,)), (2, 9, 11))])
def test_difference_targets_with_transposed_feedback_approach_bp_as_beta_shrinks(make, shape):
    """With leaky ReLU, σ'(h_l) = σ'(z_l) (σ keeps signs) and no h_l sits at the kink, so
    V_l = W_lᵀ gives J_G = J_Fᵀ exactly (max-unpool is the adjoint of max-pool): the DTP
    update tends to BP's gradient as β → 0. (Plain ReLU would not do: its dead units sit at
    h = 0, where the finite difference G(t) − G(h) lets positive changes through.)"""
    angles = {}
    for beta in (0.5, 1e-2, 1e-5):
        net = make()
        set_feedback_to_transpose(net)
        x, y = batch(shape, 4 if len(shape) == 3 else 5)
        rule = DTP(DTPConfig(beta=beta, feedback_iterations=0), net, torch.Generator().manual_seed(0))
        metrics = dtp_update(rule, x, y)
        angles[beta] = metrics["update_angle_deg/mean"]
        if beta == 1e-5:
            for l in range(1, net.depth + 1):
                assert metrics[f"update_distance/layer{l}"] < 1e-3, (l, metrics)
            for l in range(2, net.depth + 1):
                assert metrics[f"jacobian_angle_deg/layer{l}"] < 1e-4
    assert angles[1e-5] < 0.05
    assert angles[1e-5] <= angles[1e-2] <= angles[0.5] + 1e-9


def trained_alignment(rule_cls, cfg_cls, seed=0):
    torch.manual_seed(seed)
    net = mlp(hidden=(12, 12), activation="identity", classes=10)
    cfg = cfg_cls(beta=1e-3, noise=0.1, feedback_iterations=300, feedback_lr=0.5, feedback_samples=4)
    rule = rule_cls(cfg, net, torch.Generator().manual_seed(seed + 1))
    x, y = batch((10,), 10, n=64)
    return dtp_update(rule, x, y)


def test_ldrl_aligns_a_linear_network_with_bp_and_vanilla_dtp_does_worse():
    ldrl = trained_alignment(DTP, DTPConfig)
    vanilla = trained_alignment(VanillaDTP, VanillaDTPConfig)
    assert ldrl["update_angle_deg/mean"] < 10.0
    for l in (2, 3):
        assert ldrl[f"jacobian_angle_deg/layer{l}"] < 10.0
    assert vanilla["update_angle_deg/mean"] > ldrl["update_angle_deg/mean"] + 20.0


@pytest.mark.parametrize("make", [lambda: mlp(), lambda: conv(), lambda: conv(pools="none"),
                                  lambda: conv(fc=(6,))])
def test_feedback_difference_is_the_difference_of_two_feedbacks(make):
    """G_l(a) − G_l(b) through G_l's linear part equals the two feedbacks subtracted, in value and
    in V_l's gradient, for dense, pooled and unpooled conv layers and the classifier's; c_l gets
    no gradient (it cancels)."""
    net = make()
    x, _ = batch(net.layers[0].in_shape, 4)
    with torch.no_grad():
        hs, indices = net.forward_all(x)
        noisy, noisy_indices = net.forward_all(x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                                                                     dtype=x.dtype))
    for l in range(2, net.depth + 1):
        layer = net.layers[l - 1]
        grads = []
        for difference in (lambda: net.feedback(l, noisy[l], noisy_indices[l - 1]) - net.feedback(l, hs[l], indices[l - 1]),
                           lambda: net.feedback_difference(l, noisy[l], noisy_indices[l - 1], hs[l], indices[l - 1])):
            layer.feedback_weight.grad = layer.feedback_bias.grad = None
            d = difference()
            (d * torch.randn(d.shape, generator=torch.Generator().manual_seed(3), dtype=d.dtype)).sum().backward()
            grads.append((d.detach(), layer.feedback_weight.grad.clone(), layer.feedback_bias.grad))
        (written, written_dv, written_dc), (ours, ours_dv, ours_dc) = grads
        assert torch.allclose(ours, written, rtol=0, atol=1e-12)
        assert ours.abs().max() > 1e-3  # the two inputs differ
        assert torch.allclose(ours_dv, written_dv, rtol=1e-10, atol=1e-12)
        assert ours_dc is None and written_dc.abs().max() < 1e-9


def test_ldrl_loss_is_the_written_out_formula():
    """The L-DRL loss through G's differences equals −2εᵀ(G(F(h+ε)) − G(h)) + ‖G(h+η) − G(h)‖² written
    with three feedbacks, for the same noise draws, in value and in V's gradient."""
    net = conv(fc=(6,))
    x, _ = batch((2, 9, 11), 4)
    with torch.no_grad():
        hs, indices = net.forward_all(x)
    for l in range(2, net.depth + 1):
        rule = DTP(DTPConfig(noise=0.2), net, torch.Generator().manual_seed(0))
        layer = net.layers[l - 1]
        layer.feedback_weight.grad = None
        ours = rule.feedback_loss(l, hs, indices)
        ours.backward()
        ours_dv = layer.feedback_weight.grad.clone()
        rule = DTP(DTPConfig(noise=0.2), net, torch.Generator().manual_seed(0))  # the same draws again
        eps = rule._randn_like(hs[l - 1], 0.2)
        h_noisy, idx_noisy = net.forward_layer(l, hs[l - 1] + eps)
        eta = rule._randn_like(hs[l], 0.2)
        r = net.feedback(l, hs[l], indices[l - 1])
        written = (-2 * ((net.feedback(l, h_noisy, idx_noisy) - r) * eps).flatten(1).sum(1)
                   + ((net.feedback(l, hs[l] + eta, indices[l - 1]) - r) ** 2).flatten(1).sum(1)).mean()
        layer.feedback_weight.grad = None
        written.backward()
        assert torch.allclose(ours, written, rtol=1e-10, atol=1e-12)
        assert torch.allclose(ours_dv, layer.feedback_weight.grad, rtol=1e-9, atol=1e-12)


def test_ldrl_loss_gradient_is_the_jacobian_matching_gradient_in_expectation():
    """On a linear layer the L-DRL loss is −2εᵀVWε + ‖Vη‖²: its expected gradient in V is
    2σ²(V − Wᵀ). Averaged over many noise draws the sampled gradient matches it."""
    net = mlp(hidden=(6,), activation="identity", inputs=5, classes=4)
    rule = DTP(DTPConfig(noise=0.3, feedback_samples=1), net, torch.Generator().manual_seed(0))
    x, _ = batch((5,), 4, n=4000)
    with torch.no_grad():
        hs, indices = net.forward_all(x)
    layer = net.layers[1]
    grads = []
    for _ in range(20):
        layer.feedback_weight.grad = None
        rule.feedback_loss(2, hs, indices).backward()
        grads.append(layer.feedback_weight.grad.clone())
    sampled = torch.stack(grads).mean(0)
    expected = 2 * 0.3 ** 2 * (layer.feedback_weight - layer.weight.T)
    assert angle_degrees(sampled, expected.detach()) < 5.0


def test_tp_targets_are_not_difference_corrected():
    net = mlp()
    x, y = batch((10,), 5)
    hs, indices = net.forward_all(x)
    t_tp = TP(TPConfig(), net, torch.Generator().manual_seed(0)).targets(hs, indices, y)
    t_dtp = DTP(DTPConfig(), net, torch.Generator().manual_seed(0)).targets(hs, indices, y)
    assert torch.allclose(t_tp[2], net.feedback(3, t_tp[3], None))
    assert torch.allclose(t_dtp[2], hs[2] + net.feedback(3, t_dtp[3], None) - net.feedback(3, hs[3], None))


@pytest.mark.parametrize("rule_cls,cfg_cls", [(DTP, DTPConfig), (DRL, DRLConfig), (VanillaDTP, VanillaDTPConfig),
                                              (TP, TPConfig)])
def test_feedback_training_touches_only_feedback_weights(rule_cls, cfg_cls):
    net = mlp()
    x, y = batch((10,), 5)
    forward_before = [p.clone() for g in net.layer_groups() for p in g]
    feedback_before = [p.clone() for g in net.feedback_groups() for p in g]
    rule = rule_cls(cfg_cls(feedback_iterations=2, feedback_lr=0.01), net, torch.Generator().manual_seed(0))
    dtp_update(rule, x, y)
    assert all(torch.equal(a, b) for a, b in zip(forward_before, (p for g in net.layer_groups() for p in g)))
    after = [p for g in net.feedback_groups() for p in g]
    assert all(not torch.equal(a, b) for a, b in zip(feedback_before[::2], after[::2]))  # every V_l moved
    # L-DRL and DRL see only differences G(a) − G(b), in which c_l cancels; the reconstruction losses train it
    assert all(torch.equal(a, b) != (rule_cls in (VanillaDTP, TP)) for a, b in zip(feedback_before[1::2], after[1::2]))


# ----------------------------------------------------------------------------- recipes and runs


DTP_RECIPE = """\
name: tiny-dtp
seed: 3
device: cpu
data:
  dataset: synthetic
  val_size: 100
  batch_size: 20
  eval_batch_size: 100
model:
  kind: ff_conv
  channels: [3]
  kernels: 3
  paddings: 1
  fc: [16]
rule:
  kind: dtp
  beta: 0.5
  noise: [0.1, 0.1]
  feedback_iterations: [2, 3]
  feedback_warmup_iterations: 5
  feedback_lr: [0.001, 0.01]
optim:
  kind: sgd
  lr: 0.01
  momentum: 0.9
train:
  epochs: 2
  max_batches: 6
  log_every: 3
  alignment_every: 2
  checkpoint_every: 2
"""


@pytest.fixture
def dtp_recipe(tmp_path):
    path = tmp_path / "tiny-dtp.yaml"
    path.write_text(DTP_RECIPE)
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_training_logs_alignment_and_compare_shows_it(dtp_recipe, tmp_path):
    result = invoke("train", dtp_recipe, "--out", tmp_path / "runs", "-q")
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    aligned = [r for r in records if r["event"] == "alignment"]
    assert [r["step"] for r in aligned] == [2, 4, 6, 8, 10, 12]
    for key in ("update_angle_deg/layer1", "update_distance/layer2", "update_angle_deg/mean",
                "jacobian_angle_deg/layer2", "jacobian_angle_deg/layer3", "feedback_loss/layer3"):
        assert key in aligned[-1]
    assert (run / "plots" / "alignment.png").stat().st_size > 0
    shown = invoke("compare", run, "--json")
    row = json.loads(shown.stdout)[0]
    assert row["angle_to_bp_deg"] == aligned[-1]["update_angle_deg/mean"]
    assert list(row["angles_to_bp_deg"]) == ["1", "2", "3"]
    table = invoke("compare", run)
    assert "angle to BP" in table.stdout


def test_killed_dtp_run_resumes_to_the_same_weights(dtp_recipe, tmp_path, monkeypatch):
    """The feedback optimisers, the noise generator and the warm-up flag are checkpointed."""
    reference = invoke("train", dtp_recipe, "--out", tmp_path / "ref", "-q")
    assert reference.exit_code == 0, reference.output
    calls = {"n": 0}
    original = DTP.train_step

    def crashing(self, x, y):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(self, x, y)

    monkeypatch.setattr(DTP, "train_step", crashing)
    crashed = invoke("train", dtp_recipe, "--out", tmp_path / "crash", "-q")
    assert crashed.exit_code != 0
    monkeypatch.undo()
    run = next((tmp_path / "crash").iterdir())
    resumed = invoke("train", "--resume", run, "-q")
    assert resumed.exit_code == 0, resumed.output
    ref_run = Path(reference.stdout.strip().splitlines()[-1])
    a = torch.load(ref_run / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.parametrize("override,key", [
    ("rule.noise=[0.1, 0.1, 0.1]", "rule.noise"),
    ("rule.feedback_lr=[0.1]", "rule.feedback_lr"),
    ("rule.beta=0", "rule.beta"),
])
def test_bad_dtp_settings_exit_2_naming_the_key(dtp_recipe, tmp_path, override, key):
    result = invoke("train", dtp_recipe, "--out", tmp_path / "runs", "-s", override)
    assert result.exit_code == 2
    assert key in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_ep_on_a_feedforward_net_and_dtp_on_an_ep_net_are_refused(dtp_recipe, tiny_recipe, tmp_path):
    text = dtp_recipe.read_text().replace(
        "rule:\n  kind: dtp\n  beta: 0.5\n  noise: [0.1, 0.1]\n  feedback_iterations: [2, 3]\n"
        "  feedback_warmup_iterations: 5\n  feedback_lr: [0.001, 0.01]\n", "rule:\n  kind: ep\n")
    (tmp_path / "ep.yaml").write_text(text)
    result = invoke("train", tmp_path / "ep.yaml", "--fast-dev-run")
    assert result.exit_code == 2 and "rule.kind" in result.output and "feed-forward" in result.output
    result = invoke("train", tiny_recipe, "--fast-dev-run", "-s", "rule.kind=dtp")
    assert result.exit_code == 2
