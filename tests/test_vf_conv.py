"""The vector-field conv net: dynamics, initial angle, the VF update and its relation to EP (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from eprun.nets.conv import ConvConfig, ConvNet
from eprun.nets.vf_conv import VectorFieldConvNet, VFConvConfig
from eprun.optim import build_optimizer
from eprun.recipe import OptimConfig
from eprun.rules.ep import EP, EPConfig
from tests import net_checks
from tests.net_checks import relative_error, zero_grads
from tests.test_conv import close, random_batch

HEADS = [("mse", [5, 3]), ("softmax", []), ("softmax", [5])]  # (readout, fc)
POOLS = [("max", "max"), ("max", "avg"), ("avg", "none")]


def make_vf(pools=("max", "max"), readout="mse", fc=(5, 3), angle=0.0, same_update=False, activation="sigmoid",
            scale=1.0, seed=0, channels=(3, 4)):
    cfg = VFConvConfig(channels=list(channels), kernels=3, paddings=1, pools=list(pools), fc=list(fc),
                       activation=activation, readout=readout, weight_scale=scale, initial_angle=angle,
                       same_update=same_update)
    return VectorFieldConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(seed)).double()


def make_conv(pools=("max", "max"), readout="mse", fc=(5, 3), activation="sigmoid", scale=1.0, seed=0,
              channels=(3, 4)):
    cfg = ConvConfig(channels=list(channels), kernels=3, paddings=1, pools=list(pools), fc=list(fc),
                     activation=activation, readout=readout, weight_scale=scale)
    return ConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(seed)).double()


# ---------------------------------------------------------------------------- dynamics


@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("pools", POOLS)
def test_fast_relax_equals_reference_steps(pools, readout, fc):
    net = make_vf(pools, readout, fc, angle=50.0)
    net_checks.assert_relax_equals_steps(net, *random_batch(net), [(0.0, 5), (0.4, 3), (-0.3, 2)])


def test_step_uses_backward_weights_in_the_top_down_terms_only():
    """By hand: s¹ = σ(P(W_0⋆x + b_1) + B_1ᵀ⋆P_1ᵀ(s²)), s² = σ(P(W_1⋆s¹ + b_2) + reshape(B_2ᵀ s³)) …"""
    net = make_vf(("max", "avg"), "mse", [5, 3], angle=60.0)
    x, _, (s1, s2, s3, s4) = random_batch(net)
    (w0, w1, w2, w3), (b0, b1, b2, b3) = net.weights, net.biases
    bb1, bb2, bb3 = (net.backward_weight(n) for n in (1, 2, 3))
    z1 = F.max_pool2d(F.conv2d(x, w0, b0, padding=1), 2)
    u1 = s2.repeat_interleave(2, 2).repeat_interleave(2, 3) / 4  # P_1 = avg: its adjoint spreads s²/4
    want1 = net.act(z1 + F.conv_transpose2d(u1, bb1, padding=1))
    want2 = net.act(F.avg_pool2d(F.conv2d(s1, w1, b1, padding=1), 2) + (s3 @ bb2).reshape(s2.shape))
    want3 = net.act(s2.flatten(1) @ w2.T + b2 + s4 @ bb3)
    want4 = net.act(s3 @ w3.T + b3)
    with torch.no_grad():
        close(net.step(x, [s1, s2, s3, s4]), [want1, want2, want3, want4])
    assert not net.has_phi
    with pytest.raises(NotImplementedError, match="no primitive function"):
        net.phi(x, [s1, s2, s3, s4])
    for method in (net.dphi_dtheta, net.dphi_ds):
        with pytest.raises(NotImplementedError):
            method(x, [s1, s2, s3, s4])


@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("pools", POOLS)
def test_at_angle_zero_the_dynamics_are_the_conv_nets(pools, readout, fc):
    vf, conv = make_vf(pools, readout, fc, angle=0.0), make_conv(pools, readout, fc)
    for w, v in zip(conv.weights, vf.weights):  # same seed: same W (drawn in ConvNet's order)
        assert torch.equal(w, v)
    for n in range(1, len(vf.weights)):
        assert torch.equal(vf.backward_weight(n), vf.weights[n])
    x, y, state = random_batch(vf)
    target = vf.target(y, x)
    for beta, steps in [(0.0, 8), (0.3, 4)]:
        a, b = [s.clone() for s in state], [s.clone() for s in state]
        vf.relax(vf.input_drive(x), a, steps, beta, target)
        conv.relax(conv.input_drive(x), b, steps, beta, target)
        close(a, b)
        with torch.no_grad():
            close(vf.step(x, state, beta, target), conv.step(x, state, beta, target))


def test_relax_updates_the_given_state_in_place_and_handles_batch_sizes():
    net = make_vf(angle=30.0)
    for batch in (4, 3, 4):
        x, _, state = random_batch(net, batch)
        ids = [id(s) for s in state]
        assert [id(s) for s in net.relax(net.input_drive(x), state, 3)] == ids


def test_feedforward_uses_the_forward_weights_only():
    vf, conv = make_vf(angle=70.0), make_conv()
    x, _, _ = random_batch(vf)
    close(vf.feedforward(x), conv.feedforward(x))


# ---------------------------------------------------------------------------- initial angle


@pytest.mark.parametrize("angle", [0.0, 45.0, 90.0])
def test_initial_angle_is_exact(angle):
    net = make_vf(("max", "avg"), "softmax", [5], angle=angle, seed=3)
    measured = net.angles()
    assert set(measured) == {"B1", "B2"}  # no B_0 (clamped input), none for the read-out
    for n in (1, 2):
        assert abs(measured[f"B{n}"] - angle) < 1e-6, measured
        w, b = net.weights[n].detach(), net.backward_weight(n).detach()
        assert b.shape == w.shape
        torch.testing.assert_close(b.norm(), w.norm(), rtol=1e-6, atol=0)  # built in float32
        cos = (b * w).sum() / (b.norm() * w.norm())
        assert abs(math.degrees(math.acos(float(cos.clamp(-1, 1)))) - angle) < 1e-4
    if angle == 0.0:
        assert torch.equal(net.backward_weight(1), net.weights[1])


def test_config_rejects_angles_out_of_range():
    assert [k for k, _ in VFConvConfig(initial_angle=-1.0).check()] == ["initial_angle"]
    assert list(VFConvConfig(initial_angle=180.0).check()) == []


def test_layer_groups_pair_each_backward_weight_with_its_forward_weight():
    net = make_vf(readout="softmax", fc=[5], angle=10.0)
    groups = net.layer_groups()
    assert [len(g) for g in groups] == [2, 3, 3, 2]  # [W_0, b_1], [W_1, b_2, B_1], [W_2, b_3, B_2], read-out
    assert len(groups) == VectorFieldConvNet.layer_count(net.cfg)
    assert groups[1][2] is net.backward_weight(1) and groups[2][2] is net.backward_weight(2)
    assert {id(p) for g in groups for p in g} == {id(p) for p in net.parameters()}


# ---------------------------------------------------------------------------- the VF update


def _b_update_by_autograd(net, x, sa, sb):
    """∂/∂B_n of Σ (s^n_a − s^n_b)·(top-down term through B_n at s_a), batch mean, per n ≥ 1."""
    layers_a, layers_b = [x] + sa, [x] + sb
    out = {}
    for n in range(1, len(net.weights)):
        bn = net.backward_weight(n)
        with torch.enable_grad():
            if n < net.n_conv:
                u = net._unpooled_at(n, layers_a[n], layers_a[n + 1])
                td = F.conv_transpose2d(u, bn, None, net.strides[n], net.paddings[n], net.output_paddings[n])
            else:
                td = (layers_a[n + 1].flatten(1) @ bn).reshape(layers_a[n].shape)
            expr = ((layers_a[n] - layers_b[n]) * td).sum() / len(x)
            out[f"feedback.{n - 1}"] = torch.autograd.grad(expr, bn)[0]
    return out


def _w_update_by_autograd(net, x, sa, sb):
    """∂/∂θ of Σ (s^{n+1}_a − s^{n+1}_b)·P_n(W_n ⋆ s^n_a + b) (max argmax at s_a), batch mean."""
    layers_a, layers_b = [x] + sa, [x] + sb
    out = {}
    for n, (w, b) in enumerate(zip(net.weights, net.biases)):
        with torch.enable_grad():
            if n < net.n_conv:
                z = net._pool(n, F.conv2d(layers_a[n], w, b, net.strides[n], net.paddings[n]))[0]
            else:
                z = layers_a[n].flatten(1) @ w.T + b
            expr = ((layers_a[n + 1] - layers_b[n + 1]) * z).sum() / len(x)
            out[f"weights.{n}"], out[f"biases.{n}"] = torch.autograd.grad(expr, [w, b])
    return out


@pytest.mark.parametrize("same_update", [False, True])
@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("pools", POOLS)
def test_accumulate_writes_the_vf_update_which_is_autograd_of_its_defining_expressions(pools, readout, fc,
                                                                                     same_update):
    net = make_vf(pools, readout, fc, angle=50.0, same_update=same_update)
    x, _, sa = random_batch(net, seed=1)
    _, _, sb = random_batch(net, seed=2)
    want = {**_w_update_by_autograd(net, x, sa, sb), **_b_update_by_autograd(net, x, sa, sb)}
    if same_update:
        for n in range(1, len(net.weights)):
            tied = want[f"weights.{n}"] + want[f"feedback.{n - 1}"]
            want[f"weights.{n}"], want[f"feedback.{n - 1}"] = tied, tied
    reference = net.vf_update(x, sa, sb)
    names = {name for name, _ in net.named_parameters() if not name.startswith("readout")}
    assert set(reference) == set(want) == names
    zero_grads(net)
    net.accumulate_dphi_dtheta_difference_(x, sa, sb, 2.5)
    net.accumulate_dphi_dtheta_difference_(x, sa, sb, -0.5)  # accumulates: total scale 2
    params = dict(net.named_parameters())
    for name in names:
        torch.testing.assert_close(reference[name], want[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(params[name].grad, 2.0 * want[name], rtol=1e-12, atol=1e-12)


def ep_grads(net, x, y, beta, T=40, K=40):
    zero_grads(net)
    EP(EPConfig(T=T, K=K, beta=beta), net, torch.Generator().manual_seed(0)).train_step(x, y)
    return {name: p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("same_update", [True, False])
@pytest.mark.parametrize("readout,fc", HEADS[:2])
def test_ep_rule_on_vf_net_at_angle_zero_approaches_ep_update_as_beta_shrinks(same_update, readout, fc):
    """With B = W, the VF update → EP's update of the same ConvNet as β → 0.

    Tied: W_n's update is EP's up to O(β). Untied: W_n.grad + B_n.grad → EP's. Biases, W_0 and
    the read-out agree at every β.
    """
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    pools = ("max", "avg")
    errors = []
    for beta in (0.1, 0.01, 0.001):
        vf = make_vf(pools, readout, fc, angle=0.0, same_update=same_update, scale=0.5)
        conv = make_conv(pools, readout, fc, scale=0.5)
        got, want = ep_grads(vf, x, y, beta), ep_grads(conv, x, y, beta)
        n_layers = len(conv.weights)
        for n in range(n_layers):
            torch.testing.assert_close(got[f"biases.{n}"], want[f"biases.{n}"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["weights.0"], want["weights.0"], rtol=1e-9, atol=1e-12)
        if readout == "softmax":
            torch.testing.assert_close(got["readout_weight"], want["readout_weight"], rtol=1e-9, atol=1e-12)
        combined = [got[f"weights.{n}"] if same_update else got[f"weights.{n}"] + got[f"feedback.{n - 1}"]
                    for n in range(1, n_layers)]
        errors.append(relative_error(combined, [want[f"weights.{n}"] for n in range(1, n_layers)]))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 5e-3 and errors[2] < errors[0] / 30, errors


def test_same_update_keeps_backward_weights_tied_under_sgd():
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(12, 1, (1, 8, 8), 3, seed=0)
    net = make_vf(angle=0.0, same_update=True)
    rule = EP(EPConfig(T=5, K=3, beta=0.3), net, torch.Generator().manual_seed(0))
    opt = build_optimizer(OptimConfig(kind="sgd", lr=[0.3, 0.2, 0.1, 0.1]), net.layer_groups())
    for _ in range(2):
        opt.zero_grad(set_to_none=False)
        rule.train_step(x.double(), y)
        opt.step()
    for n in range(1, len(net.weights)):
        torch.testing.assert_close(net.backward_weight(n), net.weights[n], rtol=0, atol=1e-14)
    assert not torch.equal(net.weights[1], make_vf(angle=0.0).weights[1])  # it did train


# ---------------------------------------------------------------------------- training


def test_ep_rule_trains_a_vf_conv_net_on_a_separable_task():
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(60, 1, (1, 8, 8), 3, seed=0)
    cfg = VFConvConfig(channels=[4], kernels=3, paddings=1, pools="max", fc=[3], initial_angle=45.0)
    net = VectorFieldConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=15, K=6, beta=0.3), net, torch.Generator().manual_seed(0))
    opt = build_optimizer(OptimConfig(kind="adam", lr=[0.02, 0.01]), net.layer_groups())
    assert net_checks.train_on(rule, opt, x, y, 40, set_to_none=False)[2] > 0.9


# ---------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", ["laborieux2021/cifar10-vf", "laborieux2021/cifar10-vf-same-update"])
def test_vf_conv_recipes_pass_fast_dev_run(recipe, bundled_fast_dev_run):
    bundled_fast_dev_run(recipe, "-s", "device=cpu", "-s", "rule.T=2", "-s", "rule.K=1")
