"""Closed-form dynamics and ∂Φ/∂θ of the prototypical MLP against autograd of Φ (float64)."""

import pytest
import torch

from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from tests import net_checks

ACTS = ["sigmoid", "hard_sigmoid", "hard_sigmoid_half", "tanh"]


def make_net(hidden=(7, 5), activation="sigmoid", readout="mse", seed=0, scale=1.0):
    cfg = MLPConfig(hidden=list(hidden), activation=activation, readout=readout, weight_scale=scale)
    return PrototypicalMLP(cfg, (1, 3, 3), 4, torch.Generator().manual_seed(seed)).double()


def random_batch(net, batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,), generator=g)
    state = [torch.rand(batch, s, generator=g, dtype=torch.float64) for s in net.sizes[1:]]
    return x, y, state


@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("hidden", [(7,), (7, 5), (6, 5, 4)])
def test_dphi_ds_matches_autograd(hidden, readout):
    net = make_net(hidden, readout=readout)
    x, _, state = random_batch(net)
    leaves = [s.clone().requires_grad_() for s in state]
    expected = torch.autograd.grad(net.phi(x, leaves).sum(), leaves)
    for got, want in zip(net.dphi_ds(x, state), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("hidden", [(7,), (7, 5)])
def test_dphi_dtheta_matches_autograd(hidden, readout):
    net = make_net(hidden, readout=readout)
    x, _, state = random_batch(net)
    net_checks.assert_dphi_dtheta_matches_autograd(net, x, state, random_batch(net, seed=2)[2])


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("beta", [0.0, 0.3, -0.2])
def test_step_is_sigma_of_autograd_of_nudged_phi(activation, readout, beta):
    """s_{t+1} = σ(∂(Φ − βℓ)/∂s), with the loss's gradient taken by autograd."""
    net = make_net((7, 5), activation, readout)
    x, y, state = random_batch(net)
    target = net.target(y, x)
    leaves = [s.clone().requires_grad_() for s in state]
    total = net.phi(x, leaves).sum() - beta * net.loss(leaves, y).sum()
    expected = [net.act(g) for g in torch.autograd.grad(total, leaves)]
    for got, want in zip(net.step(x, state, beta, target), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("hidden", [(7,), (7, 5), (6, 5, 4)])
def test_fast_relax_equals_reference_steps(activation, readout, hidden):
    net = make_net(hidden, activation, readout)
    net_checks.assert_relax_equals_steps(net, *random_batch(net), [(0.0, 7), (0.4, 4), (-0.3, 3)])


def test_relax_updates_the_given_state_in_place_and_handles_batch_sizes():
    net_checks.assert_relax_updates_the_state_in_place(make_net((7, 5)), random_batch, (6, 3, 6), 5)


def test_feedforward_is_the_bottom_up_pass():
    net = make_net((7, 5))
    x, _, _ = random_batch(net)
    h = x.reshape(len(x), -1)
    for w, b, s in zip(net.weights, net.biases, net.feedforward(x)):
        h = net.act(h @ w.T + b)
        torch.testing.assert_close(s, h)


def test_activations_follow_the_papers():
    from eprun.nets.activations import ACTIVATIONS

    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    torch.testing.assert_close(ACTIVATIONS["sigmoid"](x), 1 / (1 + torch.exp(-4 * (x - 0.5))))
    torch.testing.assert_close(ACTIVATIONS["hard_sigmoid"](x), x.clamp(0, 1))
    torch.testing.assert_close(ACTIVATIONS["hard_sigmoid_half"](x), (1 + torch.nn.functional.hardtanh(x - 1)) / 2)
    torch.testing.assert_close(ACTIVATIONS["tanh"](x), torch.tanh(x))


def test_initialisation_is_seeded():
    a, b, c = make_net(seed=3), make_net(seed=3), make_net(seed=4)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


@pytest.mark.parametrize("kind", ["mlp", "vf_mlp"])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_nudge_after_sigma_is_the_free_step_plus_beta_times_the_error(kind, activation, dtype):
    """``nudge: post_activation`` (the authors' EPdisc/VFdisc stepper): s^N_{t+1} = σ(z^N) + β(y − s^N_t),
    the other layers as in a free step; relax (on the compiled kernel in float32 where it is built:
    tests/test_native.py) step by step equal to ``step``."""
    from eprun.nets.vf_mlp import VectorFieldMLP, VFMLPConfig

    if kind == "mlp":
        net = PrototypicalMLP(MLPConfig(hidden=[7, 5], activation=activation, nudge="post_activation"), (1, 3, 3), 4,
                              torch.Generator().manual_seed(0))
    else:
        net = VectorFieldMLP(VFMLPConfig(hidden=[7, 5], activation=activation, nudge="post_activation",
                                         initial_angle=30.0), (1, 3, 3), 4, torch.Generator().manual_seed(0))
    net = net.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 3, 3, generator=g).to(dtype)
    y = torch.randint(0, 4, (32,), generator=g)
    state = [torch.rand(32, s, generator=g).to(dtype) for s in net.sizes[1:]]
    target, beta = net.target(y, x), 0.4
    with torch.no_grad():
        free, nudged = net.step(x, state), net.step(x, state, beta, target)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(nudged[:-1], free[:-1]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(nudged[-1], free[-1] + beta * (target - state[-1]), rtol=tol, atol=tol)
    fast, ref = [s.clone() for s in state], [s.clone() for s in state]
    net.relax(net.input_drive(x), fast, 4, beta, target)
    with torch.no_grad():
        for _ in range(4):
            ref = net.step(x, ref, beta, target)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_the_nudge_after_sigma_needs_the_mse_readout():
    assert [key for key, _ in MLPConfig(nudge="post_activation", readout="softmax").check()] == ["nudge"]
    assert list(MLPConfig(nudge="post_activation").check()) == []
