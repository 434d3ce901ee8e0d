"""BPTT: gradients through the unrolled dynamics, checked against finite differences."""

import pytest
import torch

from eprun.nets.energy_mlp import EnergyMLP
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.rules.bptt import BPTT, BPTTConfig


def tiny_net(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        return PrototypicalMLP(MLPConfig(hidden=[5], weight_scale=0.7), (1, 2, 2), 3, g).double()
    cfg = EnergyMLP.Config(hidden=[5], clamp=False, dt=0.5)
    return EnergyMLP(cfg, (1, 2, 2), 3, g).double()


@pytest.mark.parametrize("kind", ["mlp", "energy_mlp"])
def test_bptt_gradient_matches_finite_differences(kind):
    net = tiny_net(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    rule = BPTT(BPTTConfig(T=6), net, torch.Generator())
    rule.train_step(x, y)

    def loss():
        with torch.no_grad():
            return rule.net.loss(rule.unroll(x), y).mean().item()

    h = 1e-6
    for p in net.parameters():
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 5)):
            old = flat[i].item()
            flat[i] = old + h
            up = loss()
            flat[i] = old - h
            down = loss()
            flat[i] = old
            assert p.grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)


def test_bptt_evaluation_uses_the_same_dynamics_as_training():
    net = tiny_net("mlp")
    x = torch.rand(4, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    rule = BPTT(BPTTConfig(T=6), net, torch.Generator())
    with torch.no_grad():
        unrolled = rule.unroll(x)
    torch.testing.assert_close(rule.evaluate(x, y)[0], net.logits(unrolled))


def test_pair_with_trains_bptt_from_the_same_initial_weights(tiny_recipe, tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from eprun.cli import app

    result = CliRunner().invoke(app, ["train", str(tiny_recipe), "-q", "--out", str(tmp_path / "runs"),
                                      "-s", "rule.pair_with=bptt", "-s", "train.epochs=1", "-s", "train.max_batches=3"])
    assert result.exit_code == 0, result.output
    ep_run, bptt_run = (Path(line) for line in result.stdout.strip().splitlines()[-2:])
    assert bptt_run.name.startswith("tiny-bptt-")
    assert "kind: bptt" in (bptt_run / "recipe.yaml").read_text()
    first = [torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (ep_run, bptt_run)]
    # the step-0 checkpoints are overwritten; rebuild the initial weights from the seed instead
    from eprun.assemble import build_network
    from eprun.recipe import load_recipe

    nets = [build_network(load_recipe(r / "recipe.yaml"), (1, 28, 28), 10, torch.device("cpu"))
            for r in (ep_run, bptt_run)]
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert first[0]["model"].keys() == first[1]["model"].keys()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_unroll_with_the_input_term_once_equals_recomputing_it_each_step(kind):
    """BPTT reuses W_0 x + b_1 (the first conv of x) across steps: same states, same gradient."""
    from eprun.nets.conv import ConvConfig, ConvNet
    from eprun.nets.mlp import MLPConfig, PrototypicalMLP
    from eprun.rules.bptt import BPTT, BPTTConfig

    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        net = PrototypicalMLP(MLPConfig(hidden=[7, 6]), (1, 4, 4), 3, g).double()
        x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    else:
        net = ConvNet(ConvConfig(channels=[2, 3], kernels=3, fc=[3]), (1, 10, 10), 3, g).double()
        x = torch.rand(5, 1, 10, 10, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    grads = []
    for reuse in (True, False):
        rule = BPTT(BPTTConfig(T=6), net, torch.Generator().manual_seed(0))
        net.zero_grad(set_to_none=True)
        if not reuse:
            rule.unroll = lambda x, rule=rule: _plain_unroll(rule.net, x, rule.cfg.T)
        rule.train_step(x, y)
        grads.append([p.grad.clone() for p in net.phi_parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def _plain_unroll(net, x, T):
    state = net.init_state(x.shape[0], like=x)
    for _ in range(T):
        state = net.step(x, state)
    return state
