"""EP's update approaches the BPTT gradient as β → 0 on a tiny converged net (float64)."""

import pytest
import torch

from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.rules.ep import EP, EPConfig
from tests import net_checks
from tests.net_checks import bptt_gradient, ep_gradient, relative_error

T = 60  # free and nudged steps alike (K = T)


def make_net(readout="mse", activation="sigmoid", hidden=(8, 6)):
    cfg = MLPConfig(hidden=list(hidden), activation=activation, readout=readout, weight_scale=0.5)
    return PrototypicalMLP(cfg, (1, 4, 4), 3, torch.Generator().manual_seed(0)).double()


def batch(n=5):
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_ep_update_approaches_bptt_gradient_as_beta_shrinks(readout, activation):
    net = make_net(readout, activation)
    x, y = batch()
    truth = bptt_gradient(net, x, y, T)
    errors = [relative_error(ep_gradient(net, x, y, beta, T), truth) for beta in (0.1, 0.01, 0.001)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_symmetric_estimate_is_second_order_in_beta():
    net = make_net()
    x, y = batch()
    truth = bptt_gradient(net, x, y, T)
    one_sided = relative_error(ep_gradient(net, x, y, 0.05, T, "one-sided"), truth)
    symmetric = relative_error(ep_gradient(net, x, y, 0.05, T, "symmetric"), truth)
    negative = relative_error(ep_gradient(net, x, y, 0.05, T, "negative"), truth)
    assert symmetric < one_sided / 5
    assert negative < 0.2 and one_sided < 0.2


def test_random_sign_draws_are_seeded_and_use_both_signs():
    net = make_net()
    rule_a = EP(EPConfig(beta=0.5, estimator="random-sign"), net, torch.Generator().manual_seed(11))
    rule_b = EP(EPConfig(beta=0.5, estimator="random-sign"), net, torch.Generator().manual_seed(11))
    draws_a = [rule_a._beta() for _ in range(40)]
    assert draws_a == [rule_b._beta() for _ in range(40)]
    assert set(draws_a) == {0.5, -0.5}


def test_bp_rule_gives_autograd_gradient_of_feedforward_loss():
    net_checks.assert_bp_rule_gives_autograd_of_the_feedforward_twin(make_net(), *batch())


@pytest.mark.parametrize("estimator", ["one-sided", "random-sign", "symmetric"])
def test_ep_training_learns_a_separable_task(estimator):
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(60, 1, (1, 4, 4), 3, seed=0)
    net = make_net(hidden=(16,)).float()
    rule = EP(EPConfig(T=20, K=8, beta=0.2, estimator=estimator), net, torch.Generator().manual_seed(0))
    before, after, accuracy = net_checks.train_on(rule, torch.optim.Adam(net.parameters(), lr=0.02), x, y, 40)
    assert after < 0.5 * before
    assert accuracy > 0.9


# ----------------------------------------------------------------------------- relaxation schedules


def _schedule_net():
    from eprun.nets.mlp import MLPConfig, PrototypicalMLP

    net = PrototypicalMLP(MLPConfig(hidden=[20, 15]), (12,), 10, torch.Generator().manual_seed(0)).double()
    x = torch.rand(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return net, x


def test_async_schedule_and_early_stop_reach_the_synchronous_fixed_point():
    """A fixed point of the even/odd schedule is one of the synchronous dynamics; stopping at a
    tolerance lands next to the T-step state, in fewer steps."""
    net, x = _schedule_net()
    drive = net.input_drive(x)
    sync = net.relax(drive, net.init_state(8, like=x), 300)
    assert net.last_relax_steps == 300
    asynchronous = net.relax(drive, net.init_state(8, like=x), 300, order="async")
    early = net.relax(drive, net.init_state(8, like=x), 300, tol=1e-9, check_every=5)
    assert net.last_relax_steps < 300 and net.last_relax_steps % 5 == 0
    for a, b, c in zip(sync, asynchronous, early):
        assert torch.allclose(a, b, atol=1e-7)
        assert torch.allclose(a, c, atol=1e-7)


def test_async_step_uses_the_fresh_odd_layers():
    """One asynchronous step: s¹ (and s³) from s_t, then s² from the new s¹ and s³."""
    net, x = _schedule_net()
    drive = net.input_drive(x)
    start = [torch.rand(s.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
             for s in net.init_state(8, like=x)]
    stepped = net.relax(drive, [s.clone() for s in start], 1, order="async")
    reference = net.step(x, start)
    assert torch.allclose(stepped[0], reference[0]) and torch.allclose(stepped[2], reference[2])
    middle = net.step(x, [reference[0], start[1], reference[2]])[1]
    assert torch.allclose(stepped[1], middle)


def test_schedules_are_refused_for_nets_without_them(tiny_recipe):
    from eprun.errors import RecipeError
    from eprun.recipe import load_recipe

    load_recipe(tiny_recipe, ["rule.order=async", "rule.tol=1e-4"])
    with pytest.raises(RecipeError, match="rule.order"):
        load_recipe(tiny_recipe, ["model.kind=energy_mlp", "rule.order=async"])


def test_training_log_reports_the_steps_phases_took_with_a_tolerance(tiny_recipe, tmp_path):
    """With tol > 0 each train record carries the mean number of steps of the free and nudged
    phases (at most T and K); without it, none."""
    import json

    from eprun.recipe import load_recipe
    from eprun.runner import train

    def train_records(overrides):
        run = train(load_recipe(tiny_recipe, overrides + ["train.epochs=1", "train.max_batches=10", "train.log_every=5"]),
                    tmp_path / "runs", quiet=True)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == "train"]

    records = train_records(["rule.tol=1e-3", "rule.check_every=2", "rule.T=40", "rule.K=20"])
    assert records
    for r in records:
        assert 0 < r["relax_steps_free"] <= 40 and 0 < r["relax_steps_nudged"] <= 20
    assert min(r["relax_steps_free"] for r in records) < 40  # the phases did end early
    assert all("relax_steps_free" not in r for r in train_records([]))
