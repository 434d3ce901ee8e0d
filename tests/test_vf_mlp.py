"""The vector-field MLP: dynamics, initial angle, the VF update and its relation to EP (float64)."""

import math

import pytest
import torch
from typer.testing import CliRunner

from eprun.cli import app
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.nets.vf_mlp import VectorFieldMLP, VFMLPConfig
from eprun.optim import build_optimizer
from eprun.recipe import OptimConfig
from eprun.rules.ep import EP, EPConfig
from tests import net_checks
from tests.net_checks import relative_error, zero_grads

ACTS = ["sigmoid", "hard_sigmoid", "tanh"]


def make_vf(hidden=(7, 5), angle=0.0, same_update=False, activation="sigmoid", readout="mse", seed=0,
            scale=1.0, input_shape=(1, 3, 3), classes=4):
    cfg = VFMLPConfig(hidden=list(hidden), activation=activation, readout=readout, weight_scale=scale,
                      initial_angle=angle, same_update=same_update)
    return VectorFieldMLP(cfg, input_shape, classes, torch.Generator().manual_seed(seed)).double()


def make_mlp(hidden=(7, 5), activation="sigmoid", readout="mse", seed=0, scale=1.0, input_shape=(1, 3, 3),
             classes=4):
    cfg = MLPConfig(hidden=list(hidden), activation=activation, readout=readout, weight_scale=scale)
    return PrototypicalMLP(cfg, input_shape, classes, torch.Generator().manual_seed(seed)).double()


def random_batch(net, batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,), generator=g)
    state = [torch.rand(batch, s, generator=g, dtype=torch.float64) for s in net.sizes[1:]]
    return x, y, state


# ---------------------------------------------------------------------------- dynamics


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("hidden", [(7,), (7, 5), (6, 5, 4)])
def test_fast_relax_equals_reference_steps(activation, readout, hidden):
    net = make_vf(hidden, angle=40.0, activation=activation, readout=readout)
    net_checks.assert_relax_equals_steps(net, *random_batch(net), [(0.0, 7), (0.4, 4), (-0.3, 3), (0.2, 1)])


def test_step_is_the_vector_field_with_backward_weights():
    """s^n_{t+1} = σ(W_{n−1}s^{n−1} + B_n s^{n+1} + b_n), written out by hand."""
    net = make_vf((7, 5), angle=60.0)
    x, _, (s1, s2, s3) = random_batch(net)
    (w0, w1, w2), (b1, b2, b3) = net.weights, net.biases
    bb1, bb2 = net.backward_weight(1), net.backward_weight(2)
    xf = x.reshape(len(x), -1)
    want = [net.act(xf @ w0.T + s2 @ bb1.T + b1), net.act(s1 @ w1.T + s3 @ bb2.T + b2), net.act(s2 @ w2.T + b3)]
    with torch.no_grad():
        for got, w in zip(net.step(x, [s1, s2, s3]), want):
            torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("readout", ["mse", "softmax"])
@pytest.mark.parametrize("activation", ACTS)
def test_at_angle_zero_the_dynamics_are_the_prototypical_mlps(readout, activation):
    vf, mlp = make_vf(angle=0.0, activation=activation, readout=readout), make_mlp(activation=activation,
                                                                                  readout=readout)
    for w, v in zip(mlp.weights, vf.weights):  # same seed: same W (drawn in the MLP's order)
        assert torch.equal(w, v)
    for n in range(1, len(vf.weights)):
        assert torch.equal(vf.backward_weight(n), vf.weights[n].T)
    x, y, state = random_batch(vf)
    target = vf.target(y, x)
    for beta, steps in [(0.0, 9), (0.3, 4)]:
        a, b = [s.clone() for s in state], [s.clone() for s in state]
        vf.relax(vf.input_drive(x), a, steps, beta, target)
        mlp.relax(mlp.input_drive(x), b, steps, beta, target)
        for got, want in zip(a, b):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            for got, want in zip(vf.step(x, state, beta, target), mlp.step(x, state, beta, target)):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_relax_updates_the_given_state_in_place_and_handles_batch_sizes():
    net_checks.assert_relax_updates_the_state_in_place(make_vf((7, 5), angle=30.0), random_batch, (6, 3, 6), 5)


def test_feedforward_uses_the_forward_weights_only():
    net = make_vf((7, 5), angle=70.0)
    x, _, _ = random_batch(net)
    h = x.reshape(len(x), -1)
    for w, b, s in zip(net.weights, net.biases, net.feedforward(x)):
        h = net.act(h @ w.T + b)
        torch.testing.assert_close(s, h)


# ---------------------------------------------------------------------------- initial angle


@pytest.mark.parametrize("angle", [0.0, 22.5, 45.0, 90.0, 135.0, 180.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_initial_angle_is_exact(angle, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        net = VectorFieldMLP(VFMLPConfig(hidden=[30, 20], initial_angle=angle), (1, 5, 5), 10,
                             torch.Generator().manual_seed(3))
    finally:
        torch.set_default_dtype(previous)
    measured = net.angles()
    assert set(measured) == {"B1", "B2"}
    for n in (1, 2):
        assert abs(measured[f"B{n}"] - angle) < 1e-6, measured
        w, b = net.weights[n].detach().double(), net.backward_weight(n).detach().double()
        assert b.shape == w.T.shape
        torch.testing.assert_close(b.norm(), w.norm(), rtol=1e-6, atol=0)  # ‖B_n‖ = ‖W_n‖
        # and by the plain cosine formula
        cos = (b * w.T).sum() / (b.norm() * w.norm())
        assert abs(math.degrees(math.acos(float(cos.clamp(-1, 1)))) - angle) < 1e-3
    if angle == 0.0:
        assert torch.equal(net.backward_weight(1), net.weights[1].T)


def test_random_part_is_seeded_and_shared_across_angles():
    a, b = make_vf(angle=30.0, seed=5), make_vf(angle=30.0, seed=5)
    c = make_vf(angle=60.0, seed=5)
    assert torch.equal(a.backward_weight(1), b.backward_weight(1))
    # same R for every angle: B(60°) lies in the plane spanned by Wᵀ and B(30°)
    wt, b30, b60 = a.weights[1].detach().T.reshape(-1), a.backward_weight(1).reshape(-1), c.backward_weight(1).reshape(-1)
    basis = torch.stack([wt, b30], dim=1)
    coeffs = torch.linalg.lstsq(basis, b60.unsqueeze(1)).solution
    torch.testing.assert_close(basis @ coeffs, b60.unsqueeze(1), rtol=0, atol=1e-6)  # built in float32


def test_config_rejects_angles_out_of_range():
    assert [k for k, _ in VFMLPConfig(initial_angle=200.0).check()] == ["initial_angle"]
    assert list(VFMLPConfig(initial_angle=180.0).check()) == []


# ---------------------------------------------------------------------------- the VF update


@pytest.mark.parametrize("same_update", [False, True])
@pytest.mark.parametrize("hidden", [(7,), (7, 5), (6, 5, 4)])
def test_accumulate_writes_the_vf_update(same_update, hidden):
    """grad_W_n += scale·(s^{n+1}_a − s^{n+1}_b)s^{nᵀ}_a, grad_B_n += scale·(s^n_a − s^n_b)s^{n+1ᵀ}_a."""
    net = make_vf(hidden, angle=50.0, same_update=same_update)
    x, _, sa = random_batch(net, seed=1)
    _, _, sb = random_batch(net, seed=2)
    layers_a, layers_b = [x.reshape(len(x), -1)] + sa, [x.reshape(len(x), -1)] + sb
    batch = len(x)
    want = {}
    for n in range(len(net.weights)):
        want[f"weights.{n}"] = (layers_a[n + 1] - layers_b[n + 1]).T @ layers_a[n] / batch
        want[f"biases.{n}"] = (layers_a[n + 1] - layers_b[n + 1]).mean(0)
        if n >= 1:
            want[f"feedback.{n - 1}"] = (layers_a[n] - layers_b[n]).T @ layers_a[n + 1] / batch
    if same_update:
        for n in range(1, len(net.weights)):
            tied = want[f"weights.{n}"] + want[f"feedback.{n - 1}"].T
            want[f"weights.{n}"], want[f"feedback.{n - 1}"] = tied, tied.T
    reference = net.vf_update(x, sa, sb)
    assert set(reference) == set(want) == {name for name, _ in net.named_parameters()}
    zero_grads(net)
    net.accumulate_dphi_dtheta_difference_(x, sa, sb, 2.5)
    net.accumulate_dphi_dtheta_difference_(x, sa, sb, -0.5)  # accumulates: total scale 2
    for name, p in net.named_parameters():
        torch.testing.assert_close(reference[name], want[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.grad, 2.0 * want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hidden", [(7,), (7, 5), (6, 5, 4)])
def test_tied_vf_update_is_the_ep_update_up_to_the_second_order_term(hidden):
    """∂Φ/∂W_n(a) − ∂Φ/∂W_n(b) = V_{W_n} + V_{B_n}ᵀ − Δ^{n+1}Δ^{nᵀ}; biases and W_0 exactly EP's."""
    vf, mlp = make_vf(hidden, angle=0.0, same_update=True), make_mlp(hidden)
    x, _, sa = random_batch(vf, seed=1)
    _, _, sb = random_batch(vf, seed=2)
    zero_grads(vf, mlp)
    vf.accumulate_dphi_dtheta_difference_(x, sa, sb, 3.0)
    mlp.accumulate_dphi_dtheta_difference_(x, sa, sb, 3.0)
    delta = [torch.zeros_like(x.reshape(len(x), -1))] + [a - b for a, b in zip(sa, sb)]
    for n in range(len(mlp.weights)):
        correction = 3.0 * delta[n + 1].T @ delta[n] / len(x)
        torch.testing.assert_close(vf.weights[n].grad - correction, mlp.weights[n].grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vf.biases[n].grad, mlp.biases[n].grad, rtol=1e-12, atol=1e-12)
        if n >= 1:
            torch.testing.assert_close(vf.backward_weight(n).grad, vf.weights[n].grad.T, rtol=0, atol=0)


def ep_grads(net, x, y, beta, T=60, K=60):
    zero_grads(net)
    EP(EPConfig(T=T, K=K, beta=beta), net, torch.Generator().manual_seed(0)).train_step(x, y)
    return {name: p.grad.clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("same_update", [True, False])
@pytest.mark.parametrize("readout", ["mse", "softmax"])
def test_ep_rule_on_vf_net_at_angle_zero_approaches_ep_update_as_beta_shrinks(same_update, readout):
    """With B = Wᵀ, the EP rule's VF update → EP's update of the same MLP as β → 0.

    Tied (``same_update``): W_n's update is EP's up to (1/β)Δs^{n+1}Δs^{nᵀ} = O(β). Untied: the
    tied weight's EP update is split between W_n and B_nᵀ, so W_n.grad + B_n.gradᵀ → EP's.
    Biases, W_0 and the read-out agree at every β (same states, same formula).
    """
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    errors = []
    for beta in (0.1, 0.01, 0.001):
        vf = make_vf(angle=0.0, same_update=same_update, readout=readout, scale=0.5)
        mlp = make_mlp(readout=readout, scale=0.5)
        got, want = ep_grads(vf, x, y, beta), ep_grads(mlp, x, y, beta)
        n_layers = len(mlp.weights)
        for n in range(n_layers):
            torch.testing.assert_close(got[f"biases.{n}"], want[f"biases.{n}"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["weights.0"], want["weights.0"], rtol=1e-9, atol=1e-12)
        if readout == "softmax":
            torch.testing.assert_close(got["readout_weight"], want["readout_weight"], rtol=1e-9, atol=1e-12)
        combined = [got[f"weights.{n}"] if same_update else got[f"weights.{n}"] + got[f"feedback.{n - 1}"].T
                    for n in range(1, n_layers)]
        errors.append(relative_error(combined, [want[f"weights.{n}"] for n in range(1, n_layers)]))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 2e-3 and errors[2] < errors[0] / 30, errors


def test_untied_vf_update_of_w_alone_is_not_eps():
    """Without ``same_update`` W_n's update is only the (ds^{n+1}) s^{nᵀ} half: O(1) away from EP's."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    got = ep_grads(make_vf(angle=0.0, scale=0.5), x, y, 0.001)
    want = ep_grads(make_mlp(scale=0.5), x, y, 0.001)
    assert relative_error([got["weights.1"]], [want["weights.1"]]) > 0.05


def test_same_update_keeps_backward_weights_tied_under_sgd():
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(40, 1, (1, 3, 3), 4, seed=0)
    net = make_vf(angle=0.0, same_update=True)
    rule = EP(EPConfig(T=15, K=6, beta=0.3), net, torch.Generator().manual_seed(0))
    opt = build_optimizer(OptimConfig(kind="sgd", lr=[0.3, 0.2, 0.1]), net.layer_groups())
    for _ in range(5):
        opt.zero_grad(set_to_none=False)
        rule.train_step(x.double(), y)
        opt.step()
    for n in range(1, len(net.weights)):
        torch.testing.assert_close(net.backward_weight(n), net.weights[n].T, rtol=0, atol=1e-14)
    assert all(a < 1e-5 for a in net.angles().values())
    assert not torch.equal(net.weights[1], make_vf(angle=0.0).weights[1])  # it did train


def test_layer_groups_pair_each_backward_weight_with_its_forward_weight():
    net = make_vf((7, 5), angle=10.0, readout="softmax")
    groups = net.layer_groups()
    assert [len(g) for g in groups] == [2, 3, 2]  # [W_0, b_1], [W_1, b_2, B_1], read-out
    assert len(groups) == VectorFieldMLP.layer_count(net.cfg)
    assert groups[1][2] is net.backward_weight(1)
    assert {id(p) for g in groups for p in g} == {id(p) for p in net.parameters()}
    net = make_vf((7, 5), angle=10.0)
    assert [len(g) for g in net.layer_groups()] == [2, 3, 3]
    assert VectorFieldMLP.layer_count(net.cfg) == 3


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("angle", [0.0, 45.0])
def test_ep_rule_trains_a_vf_net_on_a_separable_task(angle):
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(60, 1, (1, 4, 4), 3, seed=0)
    cfg = VFMLPConfig(hidden=[16], initial_angle=angle)
    net = VectorFieldMLP(cfg, (1, 4, 4), 3, torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=20, K=8, beta=0.2), net, torch.Generator().manual_seed(0))
    before, after, accuracy = net_checks.train_on(rule, torch.optim.Adam(net.parameters(), lr=0.02), x, y, 40)
    assert after < 0.5 * before
    assert accuracy > 0.9


def test_two_hidden_layer_vf_net_with_a_large_angle_trains_with_the_ep_rule():
    from eprun.data import make_synthetic

    x, y, _, _ = make_synthetic(60, 1, (1, 4, 4), 3, seed=1)
    net = VectorFieldMLP(VFMLPConfig(hidden=[16, 12], initial_angle=60.0), (1, 4, 4), 3,
                         torch.Generator().manual_seed(0))
    rule = EP(EPConfig(T=25, K=10, beta=0.3), net, torch.Generator().manual_seed(0))
    opt = build_optimizer(OptimConfig(kind="adam", lr=[0.02, 0.01, 0.005]), net.layer_groups())
    # at 60 steps the accuracy sits at 0.90–0.98 depending on float32 rounding
    assert net_checks.train_on(rule, opt, x, y, 80, set_to_none=False)[2] > 0.9


# ---------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe", ["ernoult2020/vf-1h", "ernoult2020/vf-2h"])
def test_vf_recipes_pass_fast_dev_run(recipe, bundled_fast_dev_run):
    bundled_fast_dev_run(recipe, "-s", "device=cpu")


# ---------------------------------------------------------------------------- per-step nudged update


def make_vf_per_step(hidden=(7, 5), angle=20.0, nudged_update="per_step", seed=0):
    cfg = VFMLPConfig(hidden=list(hidden), initial_angle=angle, nudged_update=nudged_update)
    return VectorFieldMLP(cfg, (1, 3, 3), 4, torch.Generator().manual_seed(seed)).double()


def test_the_per_step_update_is_the_sum_of_each_nudged_steps_increment():
    """Against the increments computed by hand from ``step`` (the out-of-place reference dynamics):
    −ΔW_n = (1/β) Σ_k (s^{n+1}_k − s^{n+1}_{k+1}) s^{nᵀ}_k / B, −ΔB_n = (1/β) Σ_k (s^n_k − s^n_{k+1}) s^{n+1ᵀ}_k / B."""
    net = make_vf_per_step()
    x, y, _ = random_batch(net)
    beta, T, K = 0.3, 40, 7
    grads = ep_grads(net, x, y, beta, T=T, K=K)
    with torch.no_grad():
        state = net.init_state(x.shape[0], like=x)
        for _ in range(T):
            state = net.step(x, state)
        target = net.target(y, x)
        layers = [net.flatten(x)] + list(state)
        want_w = [torch.zeros_like(w) for w in net.weights]
        want_b = [torch.zeros_like(b) for b in net.feedback]
        for _ in range(K):
            new = [net.flatten(x)] + list(net.step(x, layers[1:], beta, target))
            for n in range(len(net.weights)):
                want_w[n] += (layers[n + 1] - new[n + 1]).T @ layers[n] / (beta * x.shape[0])
            for n in range(1, len(net.weights)):
                want_b[n - 1] += (layers[n] - new[n]).T @ layers[n + 1] / (beta * x.shape[0])
            layers = new
    for n in range(len(net.weights)):
        assert relative_error([grads[f"weights.{n}"]], [want_w[n]]) < 1e-9
    for n in range(1, len(net.weights)):
        assert relative_error([grads[f"feedback.{n - 1}"]], [want_b[n - 1]]) < 1e-9


def test_the_per_step_update_differs_from_the_end_points_by_order_beta():
    """W_0 and the biases telescope: equal to rounding. W_n (n ≥ 1) and B_n: the gap shrinks with β
    (about ten times for β ten times smaller)."""
    gaps = {}
    for beta in (0.2, 0.02):
        per_step = ep_grads(make_vf_per_step(), *random_batch(make_vf_per_step())[:2], beta, T=40, K=8)
        endpoints = ep_grads(make_vf_per_step(nudged_update="endpoints"), *random_batch(make_vf_per_step())[:2],
                             beta, T=40, K=8)
        for name in ("weights.0", "biases.0", "biases.1", "biases.2"):
            assert relative_error([per_step[name]], [endpoints[name]]) < 1e-12, name
        gaps[beta] = {name: relative_error([per_step[name]], [endpoints[name]])
                      for name in ("weights.1", "weights.2", "feedback.0", "feedback.1")}
    for name, gap in gaps[0.2].items():
        assert gap > 1e-4 and 4 < gap / gaps[0.02][name] < 25, (name, gap, gaps[0.02][name])


def test_the_per_step_update_refuses_the_symmetric_estimator(tmp_path):
    recipe = tmp_path / "vf.yaml"
    recipe.write_text("name: vf\nseed: 0\ndevice: cpu\ndata: {dataset: synthetic, batch_size: 8}\n"
                      "model: {kind: vf_mlp, hidden: [8], nudged_update: per_step}\n"
                      "rule: {kind: ep, T: 5, K: 2, beta: 0.2, estimator: symmetric}\n"
                      "optim: {kind: sgd, lr: 0.01}\ntrain: {max_batches: 2}\n")
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "runs"), "-q"])
    assert result.exit_code == 2 and "rule.estimator" in result.output and "per_step" in result.output
