"""The energy-based EP network: closed forms against autograd of Φ, relax against step, EP against BPTT."""

import pytest
import torch
from typer.testing import CliRunner

from eprun.nets.energy_mlp import EnergyMLP, EnergyMLPConfig
from eprun.rules.ep import EP, EPConfig
from tests import net_checks
from tests.net_checks import bptt_gradient, ep_gradient, relative_error

ACTS = ["sigmoid", "hard_sigmoid", "hard_sigmoid_half", "tanh"]


def make_net(hidden=(7, 5), activation="sigmoid", dt=0.3, clamp=True, lateral=False, input_rho=True,
             scale=1.0, seed=0):
    cfg = EnergyMLPConfig(hidden=list(hidden), activation=activation, dt=dt, clamp=clamp, lateral=lateral,
                          input_rho=input_rho, weight_scale=scale)
    return EnergyMLP(cfg, (1, 3, 3), 4, torch.Generator().manual_seed(seed)).double()


def random_batch(net, batch=6, seed=1):
    """Inputs in [0, 1] and states strictly inside (0, 1), away from the hard sigmoids' kinks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,), generator=g)
    state = [0.05 + 0.9 * torch.rand(batch, s, generator=g, dtype=torch.float64) for s in net.sizes[1:]]
    return x, y, state


# --------------------------------------------------------------------------- Φ and its derivatives


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("lateral", [False, True])
@pytest.mark.parametrize("hidden,input_rho", [((7,), True), ((7, 5), False), ((6, 5, 4), True)])
def test_dphi_ds_matches_autograd(hidden, input_rho, lateral, activation):
    net = make_net(hidden, activation, lateral=lateral, input_rho=input_rho)
    x, _, state = random_batch(net)
    leaves = [s.clone().requires_grad_() for s in state]
    expected = torch.autograd.grad(net.phi(x, leaves).sum(), leaves)
    for got, want in zip(net.dphi_ds(x, state), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lateral", [False, True])
@pytest.mark.parametrize("hidden", [(7,), (7, 5)])
def test_dphi_dtheta_and_its_accumulated_difference_match_autograd(hidden, lateral):
    net = make_net(hidden, lateral=lateral)
    x, _, state = random_batch(net)
    net_checks.assert_dphi_dtheta_matches_autograd(net, x, state, random_batch(net, seed=2)[2])
    for lat in net.laterals:  # the lateral update keeps L exactly symmetric with a zero diagonal
        assert torch.equal(lat.grad, lat.grad.T) and not lat.grad.diagonal().any()


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("lateral", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3, -0.2])
def test_step_is_autograd_of_phi_eps_with_nudge(activation, lateral, beta):
    """Unclamped: s_{t+1} = ∂(Φ_ε − εβℓ)/∂s with Φ_ε = ε·phi, the paper's primitive function."""
    net = make_net((7, 5), activation, clamp=False, lateral=lateral)
    x, y, state = random_batch(net)
    target = net.target(y, x)
    eps = net.cfg.dt
    leaves = [s.clone().requires_grad_() for s in state]
    total = eps * net.phi(x, leaves).sum() - eps * beta * net.loss(leaves, y).sum()
    expected = torch.autograd.grad(total, leaves)
    for got, want in zip(net.step(x, state, beta, target), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_step_spells_out_the_papers_dynamics():
    """s^n + ε(−s^n + ρ'(s^n)(W ρ(s^{n−1}) + Wᵀ ρ(s^{n+1}) + b) [+ β(y − s^N)]), then clamp."""
    net = make_net((7,), clamp=True)
    x, y, state = random_batch(net)
    target, eps, beta, rho = net.target(y, x), net.cfg.dt, 0.4, net.act
    (w0, w1), (b1, b2) = net.weights, net.biases
    s1, s2 = state
    rp = lambda s: 4 * rho(s) * (1 - rho(s))  # noqa: E731  (the papers' sigmoid)
    h1 = rho(x.flatten(1)) @ w0.T + rho(s2) @ w1 + b1
    h2 = rho(s1) @ w1.T + b2
    want = [(s1 + eps * (-s1 + rp(s1) * h1)).clamp(0, 1),
            (s2 + eps * (-s2 + rp(s2) * h2 + beta * (target - s2))).clamp(0, 1)]
    for got, w in zip(net.step(x, state, beta, target), want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("hidden,lateral", [((7,), False), ((7, 5), True), ((6, 5, 4), False)])
def test_fast_relax_equals_reference_steps(activation, clamp, hidden, lateral):
    net = make_net(hidden, activation, clamp=clamp, lateral=lateral, scale=0.7)
    fast = net_checks.assert_relax_equals_steps(net, *random_batch(net), [(0.0, 7), (0.4, 4), (-0.3, 3)],
                                                rtol=1e-10)
    if clamp:
        assert all(0 <= s.min() and s.max() <= 1 for s in fast)


def test_relax_updates_the_given_state_in_place_and_handles_batch_sizes():
    net_checks.assert_relax_updates_the_state_in_place(make_net((7, 5)), random_batch, (6, 3, 6), 5)


def test_states_leave_zero_under_hard_sigmoid_with_clamping():
    """ρ'(0) = 1 (boundary included): the zero initial state must move."""
    net = make_net((7,), "hard_sigmoid", clamp=True)
    x, _, _ = random_batch(net)
    state = net.relax(net.input_drive(x), net.init_state(len(x), x.double()), 10)
    assert all(s.abs().sum() > 0 for s in state)


def test_feedforward_twin_and_readout():
    net = make_net((7, 5))
    x, y, state = random_batch(net)
    h = net.act(x.flatten(1))
    for w, b, s in zip(net.weights, net.biases, net.feedforward(x)):
        torch.testing.assert_close(s, net.act(h @ w.T + b))
        h = net.act(s)
    assert net.logits(state) is state[-1]
    torch.testing.assert_close(net.loss(state, y), 0.5 * ((net.target(y, x) - state[-1]) ** 2).sum(1))


def test_initialisation_is_seeded_and_laterals_are_symmetric_zero_diagonal():
    a, b, c = (make_net(lateral=True, seed=s) for s in (3, 3, 4))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    for lat in a.laterals:
        assert torch.equal(lat, lat.T) and not lat.diagonal().any() and lat.abs().sum() > 0
    groups = a.layer_groups()
    assert len(groups) == EnergyMLP.layer_count(a.cfg) == 3
    assert sum(len(g) for g in groups) == len(list(a.parameters()))


def test_config_check():
    assert list(EnergyMLPConfig().check()) == []
    cfg = EnergyMLPConfig(hidden=[], dt=1.5, readout="softmax", weight_scale=[1.0, 2.0])
    bad = {key for key, _ in cfg.check()}
    assert bad == {"hidden", "dt", "readout", "weight_scale"}
    assert {key for key, _ in EnergyMLPConfig(hidden=[4, 0], dt=0.0).check()} == {"hidden", "dt"}


# --------------------------------------------------------------------------- EP against BPTT, training


def gdu_net(activation, lateral):
    cfg = EnergyMLPConfig(hidden=[8, 6], activation=activation, dt=0.5, clamp=False, lateral=lateral,
                          weight_scale=0.5)
    return EnergyMLP(cfg, (1, 4, 4), 3, torch.Generator().manual_seed(0)).double()


def gdu_batch(n=5):
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("activation,lateral", [("sigmoid", False), ("tanh", True)])
def test_ep_update_approaches_bptt_gradient_as_beta_shrinks(activation, lateral):
    """Same scale, not ε times it: Φ = Φ_ε/ε makes EP's (1/β) estimate the loss gradient."""
    net = gdu_net(activation, lateral)
    x, y = gdu_batch()
    truth = bptt_gradient(net, x, y, 60)
    errors = [relative_error(ep_gradient(net, x, y, beta, 60), truth) for beta in (0.1, 0.01, 0.001)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2
    one_sided = relative_error(ep_gradient(net, x, y, 0.05, 60), truth)
    symmetric = relative_error(ep_gradient(net, x, y, 0.05, 60, "symmetric"), truth)
    assert symmetric < one_sided / 4  # second order in β


def test_ep_training_learns_a_separable_task():
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(60, 1, (1, 4, 4), 3, seed=0)
    cfg = EnergyMLPConfig(hidden=[16], dt=0.5, clamp=True, weight_scale=0.5)
    net = EnergyMLP(cfg, (1, 4, 4), 3, torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=16, K=6, beta=0.2), net, torch.Generator().manual_seed(0))
    before, after, accuracy = net_checks.train_on(rule, torch.optim.Adam(net.parameters(), lr=0.04), x, y, 20)
    assert after < 0.5 * before
    assert accuracy > 0.9


def test_bp_rule_gives_autograd_gradient_of_the_feedforward_twin():
    net_checks.assert_bp_rule_gives_autograd_of_the_feedforward_twin(gdu_net("sigmoid", False), *gdu_batch())


# --------------------------------------------------------------------------- recipe and CLI

RECIPE = """\
name: tiny-eb
seed: 1
device: cpu
data:
  dataset: synthetic
  batch_size: 10
  eval_batch_size: 50
model:
  kind: energy_mlp
  hidden: [12]
  dt: 0.5
  lateral: true
rule:
  kind: ep
  T: 10
  K: 4
  beta: 0.3
optim:
  kind: sgd
  lr: [0.1, 0.05]
"""


def test_energy_mlp_recipe_passes_fast_dev_run(tmp_path, monkeypatch):
    from eprun.cli import app

    (tmp_path / "eb.yaml").write_text(RECIPE)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "eb.yaml", "--fast-dev-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("fast-dev-run ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eb.yaml"]
    bad = CliRunner().invoke(app, ["train", "eb.yaml", "--fast-dev-run", "-s", "model.readout=softmax"])
    assert bad.exit_code == 2 and "model.readout" in bad.output
