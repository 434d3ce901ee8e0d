"""EP's two phases and its update in one compiled call each, against the separate relaxations
and the torch formulas."""

from __future__ import annotations

import pytest
import torch

from eprun import native
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from eprun.nets.vf_mlp import VFMLPConfig, VectorFieldMLP
from eprun.rules.ep import EP, EPConfig

pytestmark = pytest.mark.native  # also run on the forced AVX2 build in CI (.ci/run)

needs_kernel = pytest.mark.skipif(not native.dense.add_outer_available(), reason="no AVX-512 build of the kernels here")


@pytest.fixture(autouse=True)
def fresh_native_state():
    native.reset()
    yield
    native.reset()


def _net(hidden, activation="sigmoid", readout="mse", in_features=23, classes=6, seed=0, nudge="pre_activation"):
    cfg = MLPConfig(hidden=list(hidden), activation=activation, readout=readout, weight_scale=2.0, nudge=nudge)
    return PrototypicalMLP(cfg, (in_features,), classes, torch.Generator().manual_seed(seed))


def _data(batch, in_features=23, classes=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, in_features, generator=g), torch.randint(0, classes, (batch,), generator=g)


def _two_relaxations(net, drive, y, T, K, beta, **schedule):
    free = net.relax(drive, net.init_state(drive.shape[0], like=drive), T, **schedule)
    free_steps = net.last_relax_steps
    nudged = net.relax(drive, [s.clone() for s in free], K, beta, net.target(y, drive), **schedule)
    return free, nudged, (free_steps, net.last_relax_steps)


@needs_kernel
@pytest.mark.parametrize("hidden", [[37], [512], [40, 9], [8, 17, 33]])
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("nudge", ["pre_activation", "post_activation"])
def test_one_call_gives_the_two_relaxations_bit_for_bit(hidden, activation, order, nudge):
    """Free phase from s = 0, nudged phase from s* with a·β·y added to the output constant (or,
    nudged after σ, β(y − s^N) added to σ(z^N)): the same kernel steps as two calls of ``relax``,
    so every state is equal to the bit; the loss is ½‖y − s*‖² to rounding."""
    net = _net(hidden, activation, nudge=nudge)
    x, y = _data(11)
    with torch.no_grad():
        drive = net.input_drive(x)
        free, nudged, loss, steps = net.ep_phases(drive, y, 25, 8, 0.5, order=order)
        assert net.last_relax_engine == "native"
        free_ref, nudged_ref, steps_ref = _two_relaxations(net, drive, y, 25, 8, 0.5, order=order)
        assert net.last_relax_engine == "native"
    for a, b in zip(free + nudged, free_ref + nudged_ref):
        assert torch.equal(a, b)
    assert steps == steps_ref == (25.0, 8.0)
    torch.testing.assert_close(loss, net.loss(free_ref, y), rtol=1e-6, atol=1e-7)
    assert float((nudged[-1] - free[-1]).abs().max()) > 1e-3  # the nudge moved the output


@needs_kernel
@pytest.mark.parametrize("hidden", [[37], [40, 9]])
def test_vector_field_net_runs_the_same_steps_with_its_feedback_matrices(hidden):
    """The vector-field net's couplings downward are its own B_n: one call gives its two
    relaxations bit for bit, and differs from the prototypical net with the same W."""
    cfg = VFMLPConfig(hidden=list(hidden), activation="sigmoid")
    net = VectorFieldMLP(cfg, (23,), 6, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for f in net.feedback:
            f.mul_(-1.5)  # far from Wᵀ
    x, y = _data(9)
    with torch.no_grad():
        drive = net.input_drive(x)
        free, nudged, _, _ = net.ep_phases(drive, y, 20, 6, 0.5)
        assert net.last_relax_engine == "native"
        free_ref, nudged_ref, _ = _two_relaxations(net, drive, y, 20, 6, 0.5)
    for a, b in zip(free + nudged, free_ref + nudged_ref):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("hidden", [[37], [40, 9]])
def test_per_example_early_stop_counts_the_steps_of_each_phase(hidden):
    net = _net(hidden)
    x, y = _data(13)
    schedule = dict(tol=1e-3, check_every=2, tol_scope="example")
    with torch.no_grad():
        drive = net.input_drive(x)
        free, nudged, _, steps = net.ep_phases(drive, y, 40, 20, 0.2, **schedule)
        free_ref, nudged_ref, steps_ref = _two_relaxations(net, drive, y, 40, 20, 0.2, **schedule)
    for a, b in zip(free + nudged, free_ref + nudged_ref):
        assert torch.equal(a, b)
    assert steps == pytest.approx(steps_ref)
    assert steps[0] < 40 and steps[1] < 20  # examples did stop early in both phases


@needs_kernel
def test_split_over_threads_changes_no_bit():
    if not native.status()["openmp"]:
        pytest.skip("the kernel was built without OpenMP here")
    net = _net([48, 11])
    x, y = _data(63)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(net.ep_phases(net.input_drive(x), y, 20, 6, 0.3))
    finally:
        torch.set_num_threads(threads)
    (f1, n1, l1, _), (f4, n4, l4, _) = results
    for a, b in zip(f1 + n1 + [l1], f4 + n4 + [l4]):
        assert torch.equal(a, b)


def test_declines_what_it_cannot_run(monkeypatch):
    """The softmax read-out's nudge, a batch-wide tolerance, a free phase (β = 0) and
    EPRUN_NATIVE=0 are left to the separate relaxations."""
    x, y = _data(5)
    with torch.no_grad():
        soft = _net([20], readout="softmax")
        assert soft.ep_phases(soft.input_drive(x), y, 10, 4, 0.5) is None
        net = _net([20])
        drive = net.input_drive(x)
        assert net.ep_phases(drive, y, 10, 4, 0.5, tol=1e-3, tol_scope="batch") is None
        assert net.ep_phases(drive, y, 10, 4, 0.0) is None
        monkeypatch.setenv("EPRUN_NATIVE", "0")
        native.reset()
        assert net.ep_phases(drive, y, 10, 4, 0.5) is None


def _reference_update(net, x, free, nudged, c):
    """−Δθ·β·batch·c from the definition, in float64: c·(∂Φ/∂θ(s*) − ∂Φ/∂θ(s^β)) summed over the batch."""
    layers_a = [x.double()] + [s.double() for s in free]
    layers_b = [x.double()] + [s.double() for s in nudged]
    out = []
    for n in range(len(free)):
        out.append(c * (layers_a[n + 1].T @ layers_a[n] - layers_b[n + 1].T @ layers_b[n]))
        out.append(c * (layers_a[n + 1] - layers_b[n + 1]).sum(0))
    return out


@needs_kernel
@pytest.mark.parametrize("hidden", [[37], [512], [40, 9], [8, 17, 33]])
def test_update_in_one_call_is_the_definition(hidden):
    """G_0 += c·(s¹* − s¹β)ᵀx, G_n += c·(s^{n+1}*ᵀs^n* − s^{n+1}βᵀs^nβ), g += c·Σ(s* − s^β), added
    to what the gradients held, within float32 rounding of the float64 definition."""
    net = _net(hidden)
    x, y = _data(50)
    with torch.no_grad():
        free, nudged, _, _ = net.ep_phases(net.input_drive(x), y, 20, 6, 0.3)
        params = net.phi_parameters()
        for p in params:
            p.grad = torch.full_like(p, 0.25)
        net.accumulate_dphi_dtheta_difference_(x, free, nudged, 1.0 / 0.3)
    expected = _reference_update(net, x, free, nudged, 1.0 / (0.3 * 50))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double() - 0.25, e, rtol=1e-4, atol=1e-5)  # float32 terms of ~1


@needs_kernel
def test_update_split_over_threads_changes_no_bit_and_strided_inputs_use_torch():
    net = _net([40, 24])
    x, y = _data(30)
    with torch.no_grad():
        free, nudged, _, _ = net.ep_phases(net.input_drive(x), y, 20, 6, 0.3)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            weights = [torch.zeros(40, 23), torch.zeros(24, 40), torch.zeros(6, 24)]
            biases = [torch.zeros(40), torch.zeros(24), torch.zeros(6)]
            assert native.dense.ep_dense_update(x, free, nudged, weights, biases, 0.1)
            grads.append(weights + biases)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    weights = [torch.zeros(23, 40).T, torch.zeros(24, 40), torch.zeros(6, 24)]  # not contiguous
    biases = [torch.zeros(40), torch.zeros(24), torch.zeros(6)]
    assert native.dense.ep_dense_update(x, free, nudged, weights, biases, 0.1) is False
    assert all(not t.any() for t in weights + biases)


def _train_step(net, x, y, estimator="one-sided"):
    rule = EP(EPConfig(T=20, K=6, beta=0.3, estimator=estimator), net, torch.Generator().manual_seed(0))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    logits, loss = rule.train_step(x, y)
    return logits, loss, [p.grad.clone() for p in net.parameters()]


def _vf_net(hidden):
    return VectorFieldMLP(VFMLPConfig(hidden=list(hidden), activation="sigmoid"), (23,), 6,
                          torch.Generator().manual_seed(0))


@pytest.mark.parametrize("hidden", [[37], [30, 12]])
@pytest.mark.parametrize("estimator", ["one-sided", "negative", "random-sign"])
@pytest.mark.parametrize("make", [_net, _vf_net], ids=["mlp", "vf_mlp"])
def test_train_step_through_the_one_call_path_matches_the_torch_path(hidden, estimator, make, monkeypatch):
    """EP's training step (logits, loss, −Δθ in .grad) with the compiled phases and update, then
    with EPRUN_NATIVE=0: the same to float32 rounding, for +β, −β and a drawn sign, on the
    prototypical and the vector-field net."""
    x, y = _data(16)
    net = make(hidden)
    ours = _train_step(net, x, y, estimator)
    if native.library() is not None:
        assert net.last_relax_engine == "native"
    monkeypatch.setenv("EPRUN_NATIVE", "0")
    native.reset()
    theirs = _train_step(make(hidden), x, y, estimator)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
