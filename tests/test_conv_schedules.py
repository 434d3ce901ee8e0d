"""Relaxation schedules of the conv EP net: the even/odd (``async``) order and early stopping at a tolerance.

The asynchronous reference is built from autograd of Φ: σ(∂Φ/∂s) of s¹, s³, … at s_t, then of
s², s⁴, … at the half-updated state (Scellier et al. 2023's even/odd schedule).
"""

import pytest
import torch
from typer.testing import CliRunner

from eprun.rules.ep import EP, EPConfig
from tests.test_conv import close, random_batch
from tests.test_conv import make_net as conv_net

# (channels, pools): one convolution per step (n = 1); n = 1, 2; n = 1, 2, 3 with mixed pooling
GEOMETRIES = [
    ((3, 4), ("max", "max")),
    ((3, 4), ("avg", "avg")),
    ((3, 4, 2), ("max", "max", "avg")),
    ((3, 4, 2), ("avg", "max", "max")),
    ((2, 3, 2, 2), ("max", "none", "max", "avg")),
]
HEADS = [("mse", [5, 3]), ("softmax", []), ("softmax", [5])]  # (readout, fc)


def make_net(channels=(3, 4), pools=("max", "max"), readout="mse", fc=(5, 3), activation="sigmoid", scale=1.0,
             seed=0):
    """tests.test_conv's float64 conv net on 1×8×8 inputs, channels first."""
    return conv_net(pools=pools, readout=readout, fc=fc, activation=activation, scale=scale, seed=seed,
                    channels=channels)


def relaxed(net, x, state, steps, beta=0.0, y=None, **schedule):
    target = net.target(y, x) if y is not None else None
    return net.relax(net.input_drive(x), [s.clone() for s in state], steps, beta, target, **schedule)


# --------------------------------------------------------------------------- references


def sigma_of_dphi(net, x, state, beta=0.0, y=None):
    """σ(∂(Φ − βℓ)/∂s) at ``state``, every layer, by autograd of :meth:`ConvNet.phi`."""
    leaves = [s.clone().requires_grad_() for s in state]
    total = net.phi(x, leaves).sum()
    if beta != 0.0:
        total = total - beta * net.loss(leaves, y).sum()
    return [net.act(g).detach() for g in torch.autograd.grad(total, leaves)]


def async_reference_step(net, x, state, beta=0.0, y=None):
    """s¹, s³, … (0-based state[0], state[2], …) ← σ(∂Φ/∂s) at s_t; then s², s⁴, … ← σ(∂Φ/∂s)
    at s' = (the fresh s¹, s³, …, the old s², s⁴, …)."""
    first = sigma_of_dphi(net, x, state, beta, y)
    half = [new if i % 2 == 0 else old for i, (new, old) in enumerate(zip(first, state))]
    second = sigma_of_dphi(net, x, half, beta, y)
    return [fresh if i % 2 == 0 else new for i, (new, fresh) in enumerate(zip(second, half))]


@torch.no_grad()
def previous_relax(net, drive, state, steps, beta=0.0, target=None):
    """The synchronous loop of ``ConvNet.relax`` as it was before it took a schedule, verbatim in
    its arithmetic (the default path must stay bit-for-bit identical to it)."""
    a, c = net.act.scale, net.act.shift
    n_layers, n_conv, batch = len(state), net.n_conv, state[0].shape[0]
    const = [drive] + [(net.biases[n] * a + c).view(-1, 1, 1) if n < n_conv else net.biases[n] * a + c
                       for n in range(1, n_layers)]
    if beta != 0.0 and target is not None and not net.softmax_readout:
        const[-1] = const[-1] + (a * beta) * target
    cur = [s.clone() for s in state]
    for _ in range(steps):
        nxt = [torch.empty_like(s) for s in cur]
        pooled, indices = [None] * n_layers, [None] * n_layers
        for n in range(1, n_conv):
            pooled[n], indices[n] = net._pool(n, net._conv(n, cur[n - 1], bias=False))
        for i in range(n_layers):
            out, above = nxt[i], i + 1 < n_layers
            if i < n_conv and i + 1 < n_conv:
                down = net._conv_t_down(i + 1, net._unpool(i + 1, cur[i + 1], indices[i + 1]))
                if i == 0:
                    torch.add(const[0], down, alpha=a, out=out)
                else:
                    torch.add(const[i], pooled[i].add_(down), alpha=a, out=out)
            elif i < n_conv:
                if i == 0:
                    out.copy_(const[0])
                else:
                    torch.add(const[i], pooled[i], alpha=a, out=out)
                if above:
                    out.view(batch, -1).addmm_(cur[i + 1], net.weights[i + 1], alpha=a)
            else:
                torch.addmm(const[i], net.flatten(cur[i - 1]), net.weights[i].T, alpha=a, out=out)
                if above:
                    out.addmm_(cur[i + 1], net.weights[i + 1], alpha=a)
            if beta != 0.0 and target is not None and i == n_layers - 1:
                net.nudge_(out, cur[i], beta, target)
            net.act.apply_to_affine_(out)
        cur = nxt
    return cur


# --------------------------------------------------------------------------- the default path


@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("channels,pools", GEOMETRIES)
def test_sync_without_tolerance_is_the_previous_loop_bit_for_bit(channels, pools, readout, fc):
    net = make_net(channels, pools, readout, fc, activation="hard_sigmoid")
    x, y, state = random_batch(net)
    target = net.target(y, x)
    for beta, steps in [(0.0, 6), (0.4, 3), (-0.3, 3)]:
        want = previous_relax(net, net.input_drive(x), state, steps, beta, target)
        for schedule in ({}, {"order": "sync", "tol": 0.0, "check_every": 2}):
            got = relaxed(net, x, state, steps, beta, y, **schedule)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            assert net.last_relax_steps == steps


# --------------------------------------------------------------------------- the even/odd schedule


@pytest.mark.parametrize("readout,fc", HEADS)
@pytest.mark.parametrize("channels,pools", GEOMETRIES)
@pytest.mark.parametrize("beta", [0.0, 0.4, -0.3])
def test_async_steps_match_autograd_half_steps(channels, pools, readout, fc, beta):
    """One and several asynchronous steps, free and nudged, against σ(∂Φ/∂s) half-steps: the
    bottom-up pooled terms and the max-pool argmaxes must come from the state each half reads."""
    net = make_net(channels, pools, readout, fc)
    x, y, state = random_batch(net)
    want = state
    for steps in (1, 2, 3):
        want = async_reference_step(net, x, want, beta, y)
        close(relaxed(net, x, state, steps, beta, y, order="async"), want)
        assert net.last_relax_steps == steps


@pytest.mark.parametrize("channels,pools", GEOMETRIES[::2])
def test_async_is_not_the_synchronous_step(channels, pools):
    """The reference above would not catch a schedule that silently stayed synchronous."""
    net = make_net(channels, pools)
    x, _, state = random_batch(net)
    sync, asynchronous = relaxed(net, x, state, 1), relaxed(net, x, state, 1, order="async")
    close(asynchronous[0::2], sync[0::2])  # s¹, s³, … read s_t either way
    for a, s in zip(asynchronous[1::2], sync[1::2]):
        assert not torch.allclose(a, s)


def test_async_with_max_pooling_tracks_the_argmax_of_the_state_it_reads():
    """Max pooling whose window argmax moves between s_t and s_{t+1}: stale indices would route
    the top-down term to the wrong positions."""
    net = make_net((3, 4, 2), ("max", "max", "max"), scale=3.0)
    x, y, state = random_batch(net, seed=5)
    moved = [net._pool(1, net._conv(1, s))[1] for s in (state[0], async_reference_step(net, x, state)[0])]
    assert not torch.equal(*moved)
    want = state
    for _ in range(4):
        want = async_reference_step(net, x, want, 0.3, y)
    close(relaxed(net, x, state, 4, 0.3, y, order="async"), want)


@pytest.mark.parametrize("channels,pools", GEOMETRIES[1:3])
def test_vector_field_conv_net_inherits_the_schedule(channels, pools):
    """vf_conv relaxes with ConvNet.relax: async half-steps of its own (non-gradient) step, B ≠ W."""
    from eprun.nets.vf_conv import VFConvConfig, VectorFieldConvNet

    cfg = VFConvConfig(channels=list(channels), kernels=3, paddings=1, pools=list(pools), fc=[5, 3],
                       activation="sigmoid", initial_angle=60.0)
    net = VectorFieldConvNet(cfg, (1, 8, 8), 3, torch.Generator().manual_seed(0)).double()
    x, y, state = random_batch(net)
    target = net.target(y, x)
    want = state
    with torch.no_grad():
        for _ in range(3):
            first = net.step(x, want, 0.4, target)
            half = [new if i % 2 == 0 else old for i, (new, old) in enumerate(zip(first, want))]
            second = net.step(x, half, 0.4, target)
            want = [fresh if i % 2 == 0 else new for i, (new, fresh) in enumerate(zip(second, half))]
    close(relaxed(net, x, state, 3, 0.4, y, order="async"), want)


def test_unknown_order_is_refused():
    net = make_net()
    x, _, state = random_batch(net)
    with pytest.raises(ValueError, match="order"):
        relaxed(net, x, state, 1, order="random")


# --------------------------------------------------------------------------- early stopping


def converging_net(pools=("max", "avg", "none"), channels=(3, 4, 2)):
    return make_net(channels, pools, "mse", [5, 3], activation="sigmoid", scale=0.5)


@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("pools", [("max", "max", "max"), ("avg", "avg", "avg"), ("max", "avg", "none")])
def test_tolerance_stops_early_next_to_the_fixed_point(order, pools):
    net = converging_net(pools)
    x, y, _ = random_batch(net)
    zeros = net.init_state(len(x), like=x)
    fixed = relaxed(net, x, zeros, 400, order=order)
    assert net.last_relax_steps == 400
    tol = 1e-8
    early = relaxed(net, x, zeros, 400, order=order, tol=tol, check_every=5)
    taken = net.last_relax_steps
    assert 0 < taken < 400 and taken % 5 == 0
    close(early, fixed, tol=10 * tol)
    # the check before (step taken − 5) had not settled: s_{taken−5} − s_{taken−6} reached tol
    assert taken >= 10
    change = [float((a - b).abs().max()) for a, b in zip(relaxed(net, x, zeros, taken - 5, order=order),
                                                         relaxed(net, x, zeros, taken - 6, order=order))]
    assert max(change) >= tol

    # nudged phase from the free fixed point: stops early too, next to the nudged fixed point
    nudged_fixed = relaxed(net, x, fixed, 400, 0.5, y, order=order)
    nudged = relaxed(net, x, fixed, 400, 0.5, y, order=order, tol=tol, check_every=3)
    assert 0 < net.last_relax_steps < 400 and net.last_relax_steps % 3 == 0
    close(nudged, nudged_fixed, tol=10 * tol)


@pytest.mark.parametrize("order", ["sync", "async"])
def test_the_phase_ends_at_the_first_check_where_no_layer_moved_by_tol(order):
    """Against a brute-force trajectory: the change is the largest over every layer and example,
    read at steps check_every, 2·check_every, …, and the state is the one after those steps."""
    net = converging_net(("max", "max", "max"))
    x, y, _ = random_batch(net)
    trajectory = [net.init_state(len(x), like=x)]
    for _ in range(40):
        trajectory.append(relaxed(net, x, trajectory[-1], 1, order=order))
    change = [None] + [max(float((a - b).abs().max()) for a, b in zip(new, old))
                       for new, old in zip(trajectory[1:], trajectory)]
    for tol in (1e-4, 1e-7, 1e-10):
        for check_every in (1, 3, 5):
            want = next(k for k in range(check_every, 41, check_every) if change[k] < tol)
            got = relaxed(net, x, trajectory[0], 40, order=order, tol=tol, check_every=check_every)
            assert net.last_relax_steps == want
            assert all(torch.equal(g, w) for g, w in zip(got, trajectory[want], strict=True))


@pytest.mark.parametrize("order", ["sync", "async"])
def test_a_tiny_tolerance_runs_every_step(order):
    net = converging_net()
    x, y, state = random_batch(net)
    for steps, check_every in [(8, 4), (9, 4), (6, 1)]:  # no step is exactly still this early
        got = relaxed(net, x, state, steps, 0.2, y, order=order, tol=1e-300, check_every=check_every)
        assert net.last_relax_steps == steps
        for g, w in zip(got, relaxed(net, x, state, steps, 0.2, y, order=order), strict=True):
            assert torch.equal(g, w)


def test_async_reaches_the_synchronous_fixed_point():
    """A fixed point of the even/odd schedule is one of the synchronous dynamics."""
    net = converging_net(("max", "max", "avg"))
    x, y, _ = random_batch(net)
    zeros = net.init_state(len(x), like=x)
    close(relaxed(net, x, zeros, 300, order="async"), relaxed(net, x, zeros, 300), tol=1e-10)
    free = relaxed(net, x, zeros, 300)
    close(relaxed(net, x, free, 300, -0.4, y, order="async"), relaxed(net, x, free, 300, -0.4, y), tol=1e-10)


# --------------------------------------------------------------------------- the EP rule and the recipe


def test_ep_rule_passes_the_schedule_to_the_conv_net():
    """EP with async + tol on a converging conv net: phases end early, and the update is the
    synchronous one up to the tolerance (both reach the same fixed points)."""
    net = converging_net(("max", "max", "max"))
    x, y, _ = random_batch(net, batch=4, seed=3)

    def gradient(**schedule):
        for p in net.parameters():
            p.grad = None
        rule = EP(EPConfig(T=300, K=300, beta=0.1, **schedule), net, torch.Generator().manual_seed(0))
        rule.train_step(x, y)
        return [p.grad.clone() for p in net.parameters()], net.last_relax_steps

    want, steps = gradient()
    assert steps == 300
    got, steps = gradient(order="async", tol=1e-10, check_every=4)
    assert steps < 300 and steps % 4 == 0
    close(got, want, tol=1e-6)


def test_recipe_accepts_async_and_tol_for_conv_nets(tiny_recipe):
    from eprun import catalog
    from eprun.errors import RecipeError
    from eprun.recipe import load_recipe

    path = catalog.resolve("ernoult2019/proto-conv")
    recipe = load_recipe(path, ["rule.order=async", "rule.tol=1e-4", "rule.check_every=3"])
    assert recipe.model.kind == "conv"
    assert (recipe.rule.order, recipe.rule.tol, recipe.rule.check_every) == ("async", 1e-4, 3)
    load_recipe(path, ["rule.tol=1e-4"])
    load_recipe(path, ["model.kind=vf_conv", "rule.order=async"])  # vf_conv relaxes with ConvNet.relax
    with pytest.raises(RecipeError, match="rule.order") as refused:  # still refused without relax_schedules
        load_recipe(tiny_recipe, ["model.kind=energy_mlp", "rule.order=async"])
    assert "available for model.kind: mlp, conv" in str(refused.value)


def test_conv_recipe_runs_a_fast_dev_run_with_async_and_tol(tmp_path, monkeypatch):
    from eprun import catalog
    from eprun.cli import app

    path = catalog.resolve("ernoult2019/proto-conv").resolve()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [
        "train", str(path), "--fast-dev-run", "-s", "device=cpu", "-s", "data.batch_size=2",
        "-s", "data.eval_batch_size=2", "-s", "rule.T=4", "-s", "rule.K=2",
        "-s", "rule.order=async", "-s", "rule.tol=1e-3", "-s", "rule.check_every=2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("fast-dev-run ok")
