"""docs/extending.md, checked: a net and a rule written against the contracts alone (the two
classes below, as a user would put them in ``eprun/nets/toy.py`` and ``eprun/rules/chl.py``),
registered with one line each, run through every command that takes them — validation,
``--fast-dev-run``, training with the GDU and relaxation diagnostics, resume, eval, the GDU
check — with no other file touched."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from eprun.cli import app
from eprun.nets import NETWORKS
from eprun.nets.base import EPNetwork, ModelConfig
from eprun.rules import RULES
from eprun.rules.base import Relaxation, Rule, RuleConfig


# ----------------------------------------------------------------------------- eprun/nets/toy.py


@dataclass
class ToyConfig(ModelConfig):
    """``model:`` section for ``kind: toy``: one hidden layer, hard-sigmoid units."""

    kind: str = "toy"
    hidden: int = 16

    def check(self):
        if self.hidden < 1:
            yield "hidden", f"must be ≥ 1, got {self.hidden}"


class ToyNet(EPNetwork):
    """x → s¹ → s² with Φ = s¹·(W₀x + b₁) + s²·(W₁s¹ + b₂) and s_{t+1} = σ(∂Φ/∂s), σ = clamp to [0, 1]."""

    Config = ToyConfig

    @staticmethod
    def layer_count(cfg: ToyConfig) -> int:
        return 2

    def __init__(self, cfg: ToyConfig, input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator):
        super().__init__()
        n_in = int(torch.tensor(input_shape).prod())
        self.num_classes = num_classes
        self.w0 = nn.Parameter((torch.rand(cfg.hidden, n_in, generator=generator) - 0.5) / n_in ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(cfg.hidden))
        self.w1 = nn.Parameter((torch.rand(num_classes, cfg.hidden, generator=generator) - 0.5) / cfg.hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(num_classes))

    def layer_groups(self):
        return [[self.w0, self.b1], [self.w1, self.b2]]

    def describe(self) -> str:
        return f"toy {self.w0.shape[1]}-{self.w0.shape[0]}-{self.num_classes}"

    def init_state(self, batch, like):
        return [like.new_zeros(batch, self.w0.shape[0]), like.new_zeros(batch, self.num_classes)]

    def input_drive(self, x):
        return x.flatten(1) @ self.w0.T + self.b1

    def input_term(self, x):
        return self.input_drive(x)

    def step(self, x, state, beta=0.0, target=None, input_term=None):
        s1, s2 = state
        drive = input_term if input_term is not None else self.input_drive(x)
        z2 = s1 @ self.w1.T + self.b2
        if beta != 0.0 and target is not None:
            z2 = z2 + beta * (target - s2)
        return [(drive + s2 @ self.w1).clamp(0, 1), z2.clamp(0, 1)]

    @torch.no_grad()
    def relax(self, drive, state, steps, beta=0.0, target=None, **schedule):
        for _ in range(steps):
            new = self.step(None, state, beta, target, input_term=drive)
            for s, n in zip(state, new):
                s.copy_(n)
        return state

    def target(self, y, like):
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def feedforward(self, x):
        s1 = self.input_drive(x).clamp(0, 1)
        return [s1, (s1 @ self.w1.T + self.b2).clamp(0, 1)]

    def logits(self, state):
        return state[-1]

    def loss(self, state, y):
        return 0.5 * ((self.target(y, state[-1]) - state[-1]) ** 2).sum(dim=1)

    def phi(self, x, state):
        s1, s2 = state
        return (s1 * (x.flatten(1) @ self.w0.T + self.b1)).sum(1) + (s2 * (s1 @ self.w1.T + self.b2)).sum(1)

    def phi_parameters(self):
        return [self.w0, self.b1, self.w1, self.b2]

    def dphi_dtheta(self, x, state):
        s1, s2 = state
        batch = x.shape[0]
        return [s1.T @ x.flatten(1) / batch, s1.mean(0), s2.T @ s1 / batch, s2.mean(0)]

    @torch.no_grad()
    def accumulate_dphi_dtheta_difference_(self, x, state_a, state_b, scale):
        for p, a, b in zip(self.phi_parameters(), self.dphi_dtheta(x, state_a), self.dphi_dtheta(x, state_b)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(a - b, alpha=scale)


# ----------------------------------------------------------------------------- eprun/rules/chl.py


@dataclass
class CHLConfig(RuleConfig):
    """``rule:`` section for ``kind: chl``: contrastive Hebbian learning with a strongly nudged phase."""

    kind: str = "chl"
    T: int = 20
    K: int = 10
    beta: float = 1.0

    def check(self):
        if self.T < 1 or self.K < 1:
            yield "T", "T and K must be ≥ 1"

    def relaxation(self) -> Relaxation:
        return Relaxation(self.T, self.K, self.beta)


class CHL(Rule):
    """−Δθ = ∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β): EP's update without the 1/β."""

    Config = CHLConfig

    @torch.no_grad()
    def train_step(self, x, y):
        net, cfg = self.net, self.cfg
        drive = net.input_drive(x)
        free = net.relax(drive, net.init_state(x.shape[0], like=x), cfg.T)
        nudged = net.relax(drive, [s.clone() for s in free], cfg.K, cfg.beta, net.target(y, x))
        net.accumulate_dphi_dtheta_difference_(x, free, nudged, 1.0)
        return net.logits(free), net.loss(free, y)

    @torch.no_grad()
    def evaluate(self, x, y):
        free = self.net.relax(self.net.input_drive(x), self.net.init_state(x.shape[0], like=x), self.cfg.T)
        return self.net.logits(free), self.net.loss(free, y)


# ----------------------------------------------------------------------------- the two registry lines, and the checks

RECIPE = """\
name: toy-chl
seed: 3
device: cpu
data: {dataset: synthetic, val_size: 100, batch_size: 20, eval_batch_size: 100}
model: {kind: toy, hidden: 12}
rule: {kind: chl, T: 8, K: 4, beta: 0.5}
optim: {kind: sgd, lr: 0.05}
train: {epochs: 2, max_batches: 6, log_every: 3, checkpoint_every: 2, gdu_every: 3, diagnostics_every: 3}
"""


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(NETWORKS, "toy", ToyNet)  # eprun/nets/__init__.py: "toy": ToyNet,
    monkeypatch.setitem(RULES, "chl", CHL)  # eprun/rules/__init__.py: "chl": CHL,


def test_the_example_closed_forms_match_autograd_of_phi():
    """The checks extending.md asks of a new net: ∂Φ/∂θ and the step against autograd of Φ."""
    net = ToyNet(ToyConfig(hidden=5), (7,), 3, torch.Generator().manual_seed(0)).double()
    x = torch.rand(4, 7, dtype=torch.float64)
    state = [torch.rand(4, 5, dtype=torch.float64) * 0.8 + 0.1, torch.rand(4, 3, dtype=torch.float64) * 0.8 + 0.1]
    grads = torch.autograd.grad(net.phi(x, state).mean(), net.phi_parameters())
    for a, b in zip(grads, net.dphi_dtheta(x, state)):
        torch.testing.assert_close(a, b)
    leaves = [s.clone().requires_grad_() for s in state]
    dphi_ds = torch.autograd.grad(net.phi(x, leaves).sum(), leaves)
    for new, g in zip(net.step(x, state), dphi_ds):
        torch.testing.assert_close(new, g.clamp(0, 1))


def test_a_net_and_a_rule_added_with_one_registry_line_each_run_through_every_command(registered, tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    cli = CliRunner()
    result = cli.invoke(app, ["train", str(recipe), "--fast-dev-run"])
    assert result.exit_code == 0, result.output
    bad = cli.invoke(app, ["train", str(recipe), "--fast-dev-run", "-s", "model.hidden=0"])
    assert bad.exit_code == 2 and "model.hidden: must be ≥ 1" in bad.output

    result = cli.invoke(app, ["train", str(recipe), "-q", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rule"] == "chl" and summary["model"] == "toy"
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval", "gdu", "diagnostics"} <= set(events)

    evaluated = cli.invoke(app, ["eval", str(run / "checkpoints" / "last.pt"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["accuracy"] == summary["test_accuracy"]

    gdu = cli.invoke(app, ["gdu", str(recipe), "--batch", "4", "--out", str(tmp_path / "gdu")])
    assert gdu.exit_code == 0, gdu.output
    result = json.loads((tmp_path / "gdu" / "gdu.json").read_text())
    assert set(result["estimators"]["one-sided"]) == {"s1", "s2", "w0", "b1", "w1", "b2"}


def test_a_crashed_run_of_the_example_resumes_to_the_same_result(registered, tmp_path, monkeypatch):
    """The rule's generator and the net's parameters go through the checkpoint like any other's."""
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    cli = CliRunner()
    whole = cli.invoke(app, ["train", str(recipe), "-q", "--out", str(tmp_path / "a")])
    assert whole.exit_code == 0, whole.output
    original, calls = CHL.train_step, {"n": 0}

    def crashing(self, x, y):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("simulated crash")
        return original(self, x, y)

    monkeypatch.setattr(CHL, "train_step", crashing)
    crashed = cli.invoke(app, ["train", str(recipe), "-q", "--out", str(tmp_path / "b")])
    assert crashed.exit_code != 0
    run = next((tmp_path / "b").iterdir())
    monkeypatch.setattr(CHL, "train_step", original)
    resumed = cli.invoke(app, ["train", "--resume", str(run), "-q"])
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(next((tmp_path / "a").iterdir()) / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() == {"w0", "b1", "w1", "b2"}
    assert all(torch.equal(a[k], b[k]) for k in a)
