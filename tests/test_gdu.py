"""The GDU check: EP's step-by-step updates against BPTT's per-step gradients."""

import json

import pytest
import torch
from typer.testing import CliRunner

from eprun import gdu
from eprun.cli import app
from eprun.nets.energy_mlp import EnergyMLP
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.rules.bptt import BPTT, BPTTConfig


def energy_net():
    cfg = EnergyMLP.Config(hidden=[8, 6], clamp=False, dt=0.5, weight_scale=0.5)
    return EnergyMLP(cfg, (1, 4, 4), 3, torch.Generator().manual_seed(0)).double()


def proto_net(activation="sigmoid", hidden=(8, 6), nudge="pre_activation"):
    cfg = MLPConfig(hidden=list(hidden), weight_scale=0.5, activation=activation, nudge=nudge)
    return PrototypicalMLP(cfg, (1, 4, 4), 3, torch.Generator().manual_seed(0)).double()


def batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)


def test_energy_based_ep_matches_bptt_step_by_step():
    x, y = batch()
    result, _ = gdu.check(energy_net(), x, y, T=80, K=15, beta=1e-3)
    for estimator, threshold in (("one-sided", 0.01), ("symmetric", 1e-4)):
        for name, m in result["estimators"][estimator].items():
            assert m["relative_rmse"] < threshold, (estimator, name, m)
            assert m["sign_agreement"] >= 0.95, (estimator, name, m)
            assert m["cosine"] > 0.999


def test_prototypical_weight_updates_match_bptt():
    x, y = batch()
    result, _ = gdu.check(proto_net(), x, y, T=60, K=10, beta=1e-3)
    for name, m in result["estimators"]["one-sided"].items():
        if not name.startswith("s"):
            assert m["relative_rmse"] < 0.02 and m["sign_agreement"] >= 0.95, (name, m)


@pytest.mark.parametrize("nudge", ["pre_activation", "post_activation"])
def test_the_first_output_weight_update_against_bptt_for_each_nudge_form(nudge):
    """At a converged free phase, the first nudged step's update of the output weights:
    nudged inside σ, (σ(z* + β(y − s*)) − s*) s^{N−1}*ᵀ/β → σ'(z*)(y − s*) s^{N−1}*ᵀ, BPTT's
    gradient through the last step; nudged after σ, exactly (y − s*) s^{N−1}*ᵀ, BPTT's without
    the factor σ'(z*) = a·s*(1 − s*) (recipes/README.md, "GDU checks"). One example, so σ' is
    one factor per output unit."""
    net = proto_net(hidden=[8], nudge=nudge)
    x, y = batch()
    x, y = x[:1], y[:1]
    ep = gdu.ep_updates(net, x, y, T=300, K=1, beta=1e-7)["weights.1"][0]
    bptt = gdu.bptt_gradients(net, x, y, T=300, K=1)["weights.1"][0]
    s_out = gdu.free_phase(net, x, 300)[-1][0]
    sigma_prime = net.act.scale * s_out * (1 - s_out)
    assert float(sigma_prime.max()) < 0.9  # a factor the comparison can see
    if nudge == "pre_activation":
        torch.testing.assert_close(ep, bptt, rtol=1e-5, atol=1e-10)
    else:
        torch.testing.assert_close(ep * sigma_prime[:, None], bptt, rtol=1e-8, atol=1e-12)
        assert not torch.allclose(ep, bptt, rtol=1e-2, atol=0)


def test_o_of_t_state_gradients_equal_naive_reruns():
    x, y = batch()
    for net in (energy_net(), proto_net()):
        fast = gdu.bptt_gradients(net, x, y, T=30, K=12)
        naive = gdu.state_gradients_naive(net, x, y, T=30, K=12)
        for name in naive:
            torch.testing.assert_close(fast[name], naive[name], rtol=1e-10, atol=1e-12)


def test_per_step_parameter_gradients_sum_to_the_bptt_gradient():
    x, y = batch()
    net = proto_net()
    per_step = gdu.bptt_gradients(net, x, y, T=20, K=20)
    for p in net.parameters():
        p.grad = None
    BPTT(BPTTConfig(T=20), net, torch.Generator()).train_step(x, y)
    by_id = {id(p): n for n, p in net.named_parameters()}
    for p in net.phi_parameters():
        torch.testing.assert_close(-per_step[by_id[id(p)]].sum(0), p.grad, rtol=1e-10, atol=1e-12)


def test_metrics_on_known_trajectories():
    g = torch.tensor([[1.0, -2.0], [0.5, -1.0]])
    same = gdu.metrics(g, g)
    assert same["relative_rmse"] == 0 and same["sign_agreement"] == 1 and same["cosine"] == pytest.approx(1)
    flipped = gdu.metrics(-g, g)
    assert flipped["sign_agreement"] == 0 and flipped["cosine"] == pytest.approx(-1)


def test_cli_gdu_writes_json_csv_and_plots(tiny_recipe, tmp_path):
    out = tmp_path / "gdu"
    result = CliRunner().invoke(app, ["gdu", str(tiny_recipe), "--out", str(out), "--steps", "4", "--batch", "4",
                                      "-s", "rule.T=20"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "gdu.json").read_text())
    assert data["T"] == 20 and data["K"] == 4 and set(data["estimators"]) == {"one-sided", "symmetric"}
    assert "weights.0" in data["estimators"]["one-sided"]
    assert (out / "gdu.csv").read_text().startswith("estimator,tensor,relative_rmse")
    for png in ("gdu-traces.png", "gdu-rmse.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["gdu", str(tiny_recipe), "--steps", "50", "--out", str(out)])
    assert bad.exit_code == 2 and "K must be between 1 and T" in bad.output


def test_training_logs_angles_and_diagnostics_and_compare_shows_the_angle(tiny_recipe, tmp_path):
    from pathlib import Path

    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tiny_recipe), "-q", "--out", str(tmp_path / "runs"),
                                 "-s", "train.gdu_every=5", "-s", "train.diagnostics_every=5", "-s", "train.epochs=1",
                                 "-s", "train.max_batches=10", "-s", "train.convergence_tol=1e-12"])
    assert result.exit_code == 0, result.output
    run = Path(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gdu_records = [r for r in records if r["event"] == "gdu"]
    assert [r["step"] for r in gdu_records] == [5, 10]
    assert 0 <= gdu_records[-1]["angle_deg"] < 90 and "angle_deg/weights.0" in gdu_records[-1]
    diag = [r for r in records if r["event"] == "diagnostics"]
    assert len(diag) == 2 and {"free_residual", "nudged_residual", "saturated_fraction", "phi"} <= set(diag[0])
    summary = json.loads((run / "summary.json").read_text())
    assert "free phase not converged" in summary["warnings"][0]
    rows = json.loads(runner.invoke(app, ["compare", str(run), "--json"]).stdout)
    assert rows[0]["angle_to_bptt_deg"] == gdu_records[-1]["angle_deg"]
    assert "angle to BPTT" in runner.invoke(app, ["compare", str(run)]).stdout
