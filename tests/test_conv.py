"""The prototypical conv EP network: closed forms against autograd of Φ, relax against step, EP against BPTT."""

import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from eprun.nets.conv import ConvConfig, ConvNet
from eprun.rules.ep import EP, EPConfig
from tests import net_checks
from tests.net_checks import bptt_gradient, ep_gradient, relative_error

ACTS = ["sigmoid", "hard_sigmoid", "hard_sigmoid_half", "tanh"]
POOLS = [("max", "max"), ("max", "avg"), ("avg", "none"), ("none", "max")]
HEADS = [("mse", [5, 3]), ("softmax", []), ("softmax", [5])]  # (readout, fc)


def make_net(pools=("max", "max"), readout="mse", fc=(5, 3), activation="sigmoid", strides=1, scale=1.0,
             input_shape=(1, 8, 8), seed=0, channels=(3, 4)):
    cfg = ConvConfig(channels=list(channels), kernels=3, strides=strides, paddings=1, pools=list(pools), fc=list(fc),
                     activation=activation, readout=readout, weight_scale=scale)
    return ConvNet(cfg, input_shape, 3, torch.Generator().manual_seed(seed)).double()


def random_batch(net, batch=4, seed=1):
    """Random inputs and states: with random floats, ties in a max-pool window have measure zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *net.input_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=g)
    state = [torch.rand(batch, *shape, generator=g, dtype=torch.float64) for shape in net.state_shapes]
    return x, y, state


def close(got, want, tol=1e-12):
    net_checks.close(got, want, tol, tol)


# --------------------------------------------------------------------------- Φ and its derivatives


@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("pools", POOLS)
def test_dphi_ds_matches_autograd(pools, readout, fc):
    net = make_net(pools, readout, fc)
    x, _, state = random_batch(net)
    leaves = [s.clone().requires_grad_() for s in state]
    close(net.dphi_ds(x, state), torch.autograd.grad(net.phi(x, leaves).sum(), leaves))


@pytest.mark.parametrize("channels,pools,strides,input_shape,shapes", [
    # stride 2 (the transposed convolution needs an output padding), pooling that drops a row
    ((3, 4), ("max", "avg"), [1, 2], (2, 9, 9), [(3, 4, 4), (4, 1, 1)]),
    ((3,), ("max",), 1, (1, 8, 8), [(3, 4, 4)]),  # one conv layer, fc above it
    ((3, 4, 2), ("none", "max", "avg"), 1, (1, 8, 8), [(3, 8, 8), (4, 4, 4), (2, 2, 2)]),  # conv above conv
])
@pytest.mark.parametrize("readout,fc", HEADS[:2])
def test_other_geometries_match_autograd_and_relax_matches_step(channels, pools, strides, input_shape, shapes,
                                                                 readout, fc):
    net = make_net(pools, readout, fc, strides=strides, input_shape=input_shape, channels=channels)
    assert net.state_shapes[:len(shapes)] == shapes
    x, y, state = random_batch(net)
    leaves = [s.clone().requires_grad_() for s in state]
    close(net.dphi_ds(x, state), torch.autograd.grad(net.phi(x, leaves).sum(), leaves))
    close(net.dphi_dtheta(x, state), torch.autograd.grad(net.phi(x, state).mean(), net.phi_parameters()))
    target = net.target(y, x)
    fast = [s.clone() for s in state]
    net.relax(net.input_drive(x), fast, 3, 0.3, target)
    ref = [s.clone() for s in state]
    with torch.no_grad():
        for _ in range(3):
            ref = net.step(x, ref, 0.3, target)
    close(fast, ref)


@pytest.mark.parametrize("readout,fc", HEADS[:2])
@pytest.mark.parametrize("pools", POOLS)
def test_dphi_dtheta_and_its_accumulated_difference_match_autograd(pools, readout, fc):
    net = make_net(pools, readout, fc)
    x, _, state = random_batch(net)
    net_checks.assert_dphi_dtheta_matches_autograd(net, x, state, random_batch(net, seed=2)[2])


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("beta", [0.0, 0.3, -0.2])
def test_step_is_sigma_of_autograd_of_nudged_phi(activation, readout, fc, beta):
    """s_{t+1} = σ(∂(Φ − βℓ)/∂s), with the loss's gradient taken by autograd."""
    net = make_net(("max", "avg"), readout, fc, activation)
    x, y, state = random_batch(net)
    target = net.target(y, x)
    leaves = [s.clone().requires_grad_() for s in state]
    total = net.phi(x, leaves).sum() - beta * net.loss(leaves, y).sum()
    close(net.step(x, state, beta, target), [net.act(g) for g in torch.autograd.grad(total, leaves)])


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("pools", POOLS[:3])
def test_fast_relax_equals_reference_steps(pools, readout, fc, activation):
    net = make_net(pools, readout, fc, activation)
    net_checks.assert_relax_equals_steps(net, *random_batch(net), [(0.0, 5), (0.4, 3), (-0.3, 3)])


def make_nudged_after(activation="hard_sigmoid", fc=(5, 3), seed=0):
    cfg = ConvConfig(channels=[3, 4], kernels=3, paddings=1, pools=["max", "max"], fc=list(fc),
                     activation=activation, nudge="post_activation")
    return ConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("order", ["sync", "async"])
def test_the_nudge_after_sigma_is_the_free_step_plus_beta_times_the_error(activation, order):
    """``nudge: post_activation``: s^N_{t+1} = σ(z^N) + β(y − s^N_t), the other layers as in a free
    step (the free step is σ of autograd of Φ, tested above); relax equals step, step by step."""
    net = make_nudged_after(activation)
    x, y, state = random_batch(net)
    target = net.target(y, x)
    beta = 0.4
    with torch.no_grad():
        free = net.step(x, state)
        nudged = net.step(x, state, beta, target)
    close(nudged[:-1], free[:-1])
    close([nudged[-1]], [free[-1] + beta * (target - state[-1])])
    fast, ref = [s.clone() for s in state], [s.clone() for s in state]
    net.relax(net.input_drive(x), fast, 3, beta, target, order=order)
    with torch.no_grad():
        for _ in range(3):
            if order == "sync":
                ref = net.step(x, ref, beta, target)
            else:  # odd layers from s_t, then even layers from the fresh odd ones; s^N's nudge reads s^N_t
                odd = net.step(x, ref, beta, target)
                mixed = [odd[i] if i % 2 == 0 else ref[i] for i in range(len(ref))]
                even = net.step(x, mixed, beta, target)
                if (len(ref) - 1) % 2 == 1:  # s^N is even: its nudge reads s^N_t, not the mixed state's
                    even[-1] = even[-1] - beta * (target - mixed[-1]) + beta * (target - ref[-1])
                ref = [odd[i] if i % 2 == 0 else even[i] for i in range(len(ref))]
    close(fast, ref)


def test_an_output_below_minus_beta_is_moved_by_the_nudge_only_after_sigma():
    """Every output unit's z^N far below 0 (a hard sigmoid at 0 whatever the nudge inside it):
    nudged before σ, s^β = s* at the output, EP's update of the output layer is zero and that of
    the layers below only the free phase's unfinished relaxation, so training cannot leave that
    state; nudged after σ, the target unit rises to β/(1 + β) and the output bias is updated."""
    updates = {}
    for nudge in ("pre_activation", "post_activation"):
        cfg = ConvConfig(channels=[3, 4], kernels=3, paddings=1, pools="max", fc=[3], activation="hard_sigmoid",
                         nudge=nudge)
        net = ConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(0)).double()
        with torch.no_grad():
            net.biases[-1].fill_(-5.0)
        x, y, _ = random_batch(net)
        rule = EP(EPConfig(T=30, K=20, beta=0.4), net, torch.Generator().manual_seed(0))
        net.zero_grad()
        rule.train_step(x, y)
        free = net.relax(net.input_drive(x), net.init_state(len(x), like=x), 30)
        assert torch.all(free[-1] == 0)
        updates[nudge] = {name: p.grad.abs().max().item() for name, p in net.named_parameters()}
        nudged = net.relax(net.input_drive(x), [s.clone() for s in free], 20, 0.4, net.target(y, x))
        if nudge == "post_activation":
            torch.testing.assert_close(nudged[-1], net.target(y, x) * 0.4 / 1.4, rtol=0, atol=1e-6)
    pre, post = updates["pre_activation"], updates["post_activation"]
    assert pre["weights.2"] == pre["biases.2"] == 0.0  # the output layer's: none
    assert max(pre.values()) < 1e-6  # below it, what the nudged steps still relax (the free phase's residue)
    assert post["biases.2"] > 0.1


def test_relax_updates_the_given_state_in_place_and_handles_batch_sizes():
    net_checks.assert_relax_updates_the_state_in_place(make_net(), random_batch, (4, 3, 4), 3)


def test_feedforward_is_the_torch_cnn_with_the_same_weights():
    net = make_net(("max", "avg"), "softmax", [5], "hard_sigmoid")
    x, _, _ = random_batch(net)
    (w0, w1, w2), (b0, b1, b2) = net.weights, net.biases
    h1 = F.max_pool2d(F.conv2d(x, w0, b0, padding=1), 2).clamp(0, 1)
    h2 = F.avg_pool2d(F.conv2d(h1, w1, b1, padding=1), 2).clamp(0, 1)
    h3 = F.linear(h2.flatten(1), w2, b2).clamp(0, 1)
    close(net.feedforward(x), [h1, h2, h3])


# --------------------------------------------------------------------------- structure, config, fit


def test_shapes_groups_and_seeded_default_initialisation():
    a, b, c = make_net(readout="softmax", fc=[5]), make_net(readout="softmax", fc=[5]), make_net(seed=4)
    assert a.state_shapes == [(3, 4, 4), (4, 2, 2), (5,)]
    assert [s.shape[1:] for s in a.init_state(2, torch.zeros(1))] == [torch.Size(s) for s in a.state_shapes]
    groups = a.layer_groups()
    assert len(groups) == ConvNet.layer_count(a.cfg) == 4
    assert sum(len(g) for g in groups) == len(list(a.parameters()))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.weights[0], c.weights[0])
    for w, fan_in in zip(a.weights, (1 * 9, 3 * 9, 16)):  # U(−1/√fan_in, 1/√fan_in) like torch's Conv2d/Linear
        assert w.abs().max() <= 1 / math.sqrt(fan_in)


def test_config_check_and_scalar_per_layer_values():
    assert list(ConvConfig().check()) == []
    assert ConvConfig(channels=[8, 8, 8], kernels=3).per_conv_layer(3) == [3, 3, 3]
    bad = ConvConfig(channels=[4, 0], kernels=[3], strides=0, paddings=-1, pool_size=0, fc=[],
                     weight_scale=[1.0])
    assert {key for key, _ in bad.check()} == {"channels", "kernels", "strides", "paddings", "pool_size", "fc",
                                              "weight_scale"}
    assert {key for key, _ in ConvConfig(channels=[], pools=["max", "max"], fc=[10, -1]).check()} == {
        "channels", "pools", "fc"}
    assert [key for key, _ in ConvConfig(pools=["max", "min"]).check()] == ["pools"]
    assert [key for key, _ in ConvConfig(nudge="post_activation", readout="softmax", fc=[]).check()] == ["nudge"]
    assert list(ConvConfig(nudge="post_activation").check()) == []
    assert list(ConvConfig(readout="softmax", fc=[], weight_scale=[1.0, 1.0, 1.0]).check()) == []


def test_check_fits_names_what_does_not_fit_and_the_constructor_refuses_it():
    fits = ConvNet.check_fits
    assert fits(ConvConfig(), (1, 28, 28), 10) == []
    assert fits(ConvConfig(), (1, 12, 12), 10)[0].startswith("kernels:")  # 12 → 8 → 4: conv 5×5 does not fit
    assert fits(ConvConfig(), (1, 14, 14), 10)[0].startswith("pools:")  # 14 → 10 → 5 → 1: pool 2×2 does not
    assert fits(ConvConfig(), (784,), 10)[0].startswith("channels:")
    wrong_out = fits(ConvConfig(fc=[12]), (1, 28, 28), 10)
    assert len(wrong_out) == 1 and wrong_out[0].startswith("fc:") and "10" in wrong_out[0]
    assert fits(ConvConfig(readout="softmax", fc=[12]), (1, 28, 28), 10) == []
    with pytest.raises(ValueError, match="fc: "):
        ConvNet(ConvConfig(fc=[12]), (1, 28, 28), 10, torch.Generator())


# --------------------------------------------------------------------------- EP against BPTT, BP, training

T = 40


def gdu_batch(n=5):
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("pools,readout,fc,activation", [
    (("max", "max"), "mse", [3], "sigmoid"),
    (("max", "avg"), "softmax", [], "tanh"),
])
def test_ep_update_approaches_bptt_gradient_as_beta_shrinks(pools, readout, fc, activation):
    net = make_net(pools, readout, fc, activation, scale=0.5)
    x, y = gdu_batch()
    truth = bptt_gradient(net, x, y, T)
    errors = [relative_error(ep_gradient(net, x, y, beta, T), truth) for beta in (0.1, 0.01, 0.001)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2
    one_sided = relative_error(ep_gradient(net, x, y, 0.05, T), truth)
    symmetric = relative_error(ep_gradient(net, x, y, 0.05, T, "symmetric"), truth)
    assert symmetric < one_sided / 5  # second order in β


def test_bp_rule_gives_autograd_gradient_of_the_feedforward_twin():
    net_checks.assert_bp_rule_gives_autograd_of_the_feedforward_twin(make_net(("max", "avg"), "softmax", [5]),
                                                                      *gdu_batch())


def test_ep_training_learns_a_separable_task():
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(60, 1, (1, 8, 8), 3, seed=0)
    cfg = ConvConfig(channels=[4, 8], kernels=3, paddings=1, pools="max", fc=[3], activation="hard_sigmoid")
    net = ConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=15, K=6, beta=0.2, estimator="symmetric"), net, torch.Generator().manual_seed(0))
    before, after, accuracy = net_checks.train_on(rule, torch.optim.Adam(net.parameters(), lr=0.01), x, y, 30)
    assert after < 0.5 * before
    assert accuracy > 0.9


# --------------------------------------------------------------------------- recipes and CLI

SHRINK = ["-s", "device=cpu", "-s", "data.batch_size=2", "-s", "data.eval_batch_size=2"]
RECIPES = {
    "ernoult2019/proto-conv": ["-s", "rule.T=3", "-s", "rule.K=2"],
    "laborieux2021/cifar10-one-sided": ["-s", "rule.T=2", "-s", "rule.K=1"],
    "laborieux2021/cifar10-random-sign": ["-s", "rule.T=2", "-s", "rule.K=1"],
    "laborieux2021/cifar10-symmetric": ["-s", "rule.T=2", "-s", "rule.K=1"],
    "laborieux2021/cifar10-symmetric-ce": ["-s", "rule.T=2", "-s", "rule.K=1"],
    "laborieux2021/cifar10-bp": [],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_conv_recipes_pass_a_shrunk_fast_dev_run(name, bundled_fast_dev_run):
    """The paper recipes assemble and run end to end (T, K and batch shrunk: the real ones take minutes on CPU)."""
    bundled_fast_dev_run(name, *SHRINK, *RECIPES[name])


def test_conv_recipe_errors_name_the_key(tmp_path, monkeypatch):
    from eprun import catalog
    from eprun.cli import app

    path = catalog.resolve("ernoult2019/proto-conv").resolve()
    monkeypatch.chdir(tmp_path)
    bad = CliRunner().invoke(app, ["train", str(path), "--fast-dev-run", "-s", "model.kernels=[5]"])
    assert bad.exit_code == 2 and "model.kernels" in bad.output
    bad = CliRunner().invoke(app, ["train", str(path), "--fast-dev-run", "-s", "optim.lr=[0.1, 0.1]"])
    assert bad.exit_code == 2 and "optim.lr" in bad.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(100, 64, 8, 8), (20, 32, 24, 24), (7, 5, 9, 9), (2, 3, 6, 6)])
@pytest.mark.parametrize("window", [2, 3])
def test_max_pool_through_channels_last_is_torchs_bit_for_bit(shape, window):
    """The CPU pooling of large inputs runs on a channels-last copy: the same values and argmax
    indices as F.max_pool2d on the input as it is, with ties (few distinct values) and NaNs, and
    the results contiguous."""
    from eprun.nets.pooling import max_pool_with_indices

    g = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 3, shape, generator=g).float()
    nans = torch.rand(shape, generator=g)
    nans[nans < 0.1] = float("nan")
    for z in (ties, nans):
        values, indices = max_pool_with_indices(z, window)
        expected_values, expected_indices = F.max_pool2d(z, window, window, return_indices=True)
        assert torch.equal(indices, expected_indices)
        assert torch.allclose(values, expected_values, equal_nan=True)
        assert values.is_contiguous() and indices.is_contiguous()
