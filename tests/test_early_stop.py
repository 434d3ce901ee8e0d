"""Early stopping of a relaxation at a tolerance, for the whole batch or per example (``tol_scope``).

With ``tol_scope: example`` each example stops at its own first check where none of its states
moved by ``tol`` or more, and is held there while the others go on. The reference is the
definition itself: every example relaxed alone, a batch of one, with the batch-wide rule.
"""

from __future__ import annotations

import math

import pytest
import torch

from eprun import native
from eprun.nets.mlp import MLPConfig, PrototypicalMLP
from tests.test_conv_schedules import make_net as conv_net
from tests.test_conv_schedules import relaxed
from tests.test_native import needs_kernels

pytestmark = pytest.mark.native  # also run on the forced AVX2 build in CI (.ci/run)


@pytest.fixture(autouse=True)
def fresh_native_state():
    native.reset()
    yield
    native.reset()


def mlp(hidden=(20, 15), seed=0, dtype=torch.float64, scale=2.0, readout="mse"):
    cfg = MLPConfig(hidden=list(hidden), weight_scale=scale, readout=readout)
    net = PrototypicalMLP(cfg, (12,), 5, torch.Generator().manual_seed(seed))
    return net.to(dtype)


def batch(n=9, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 12, generator=g, dtype=dtype) * 3, torch.randint(0, 5, (n,), generator=g)


def relax(net, x, y, steps, beta=0.0, start=None, **schedule):
    state = [s.clone() for s in start] if start is not None else net.init_state(x.shape[0], like=x)
    target = net.target(y, x) if beta else None
    out = net.relax(net.input_drive(x), state, steps, beta, target, **schedule)
    return out, net.last_relax_steps


def each_alone(net, x, y, steps, beta=0.0, start=None, **schedule):
    """Every example relaxed by itself under the batch-wide rule; the states stacked and the
    steps of each."""
    rows, taken = [], []
    for b in range(x.shape[0]):
        alone_start = [s[b:b + 1] for s in start] if start is not None else None
        state, steps_b = relax(net, x[b:b + 1], y[b:b + 1], steps, beta, alone_start, tol_scope="batch", **schedule)
        rows.append(state)
        taken.append(steps_b)
    return [torch.cat(layer) for layer in zip(*rows)], taken


@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("readout", ["mse", "softmax"])
def test_per_example_scope_is_each_example_relaxed_alone(order, check_every, readout, monkeypatch):
    """Dense net, torch path (float64): the batch with ``tol_scope: example`` equals every example
    relaxed alone, free and nudged (the softmax read-out's nudge reads each example's own target
    and read-out), and the mean of their steps is reported."""
    monkeypatch.setenv("EPRUN_NATIVE", "0")
    net, (x, y) = mlp(readout=readout), batch()
    schedule = dict(tol=1e-6, check_every=check_every, order=order)
    with torch.no_grad():
        free, free_steps = relax(net, x, y, 200, tol_scope="example", **schedule)
        want_free, alone_free = each_alone(net, x, y, 200, **schedule)
        nudged, nudged_steps = relax(net, x, y, 60, 0.7, free, tol_scope="example", **schedule)
        want_nudged, alone_nudged = each_alone(net, x, y, 60, 0.7, want_free, **schedule)
    assert len(set(alone_free)) > 1  # the examples did stop at different steps
    assert max(alone_free) < 200
    for got, want in zip(free + nudged, want_free + want_nudged):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert free_steps == pytest.approx(sum(alone_free) / len(alone_free))
    assert nudged_steps == pytest.approx(sum(alone_nudged) / len(alone_nudged))
    # the batch-wide rule runs every example until the slowest stops
    _, batch_steps = relax(net, x, y, 200, tol_scope="batch", **schedule)
    assert batch_steps == max(alone_free)


@pytest.mark.parametrize("order", ["sync", "async"])
def test_conv_per_example_scope_is_each_example_relaxed_alone(order):
    """The conv net's loop follows the same rule (max pooling: the argmax of a held example is
    recomputed from its held state)."""
    net = conv_net(scale=2.0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5, *net.input_shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    start = net.init_state(5, like=x)
    schedule = dict(tol=1e-7, check_every=2, order=order)
    with torch.no_grad():
        got = relaxed(net, x, start, 150, tol_scope="example", **schedule)
        mean_steps = net.last_relax_steps
        rows, taken = [], []
        for b in range(5):
            rows.append(relaxed(net, x[b:b + 1], [s[b:b + 1] for s in start], 150, tol_scope="batch", **schedule))
            taken.append(net.last_relax_steps)
    assert len(set(taken)) > 1 and max(taken) < 150
    for layer, want in zip(got, (torch.cat(layer) for layer in zip(*rows))):
        torch.testing.assert_close(layer, want, rtol=0, atol=1e-12)
    assert mean_steps == pytest.approx(sum(taken) / 5)


def test_a_nan_counts_as_moving_and_stops_nobody_else(monkeypatch):
    """An example whose state is NaN never stops (max |Δ| < tol is false) and runs every step;
    the others stop as they would without it."""
    monkeypatch.setenv("EPRUN_NATIVE", "0")
    net, (x, y) = mlp(), batch(6)
    x[2, 0] = float("nan")
    with torch.no_grad():
        got, mean_steps = relax(net, x, y, 100, tol=1e-6, check_every=4, tol_scope="example")
        clean = [i for i in range(6) if i != 2]
        want, taken = each_alone(net, x[clean], y[clean], 100, tol=1e-6, check_every=4)
    assert got[0][2].isnan().all() and not any(layer[clean].isnan().any() for layer in got)
    assert min(taken) < 100
    assert mean_steps == pytest.approx((sum(taken) + 100) / 6)
    for layer, w in zip(got, want):
        torch.testing.assert_close(layer[clean], w, rtol=0, atol=1e-12)


def test_scope_is_checked():
    net, (x, y) = mlp(), batch(3)
    with pytest.raises(ValueError, match="tol_scope"):
        relax(net, x, y, 10, tol=1e-3, tol_scope="layer")


@needs_kernels
@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("hidden", [(20, 15), (33,)])
def test_native_per_example_stop_matches_torch(order, hidden, monkeypatch):
    """The compiled kernel stops each example as the torch path does: same states (float32
    rounding) and the same steps, free and nudged; with the batch-wide scope the torch path runs."""
    net, (x, y) = mlp(hidden, dtype=torch.float32), batch(11, dtype=torch.float32)
    schedule = dict(tol=1e-4, check_every=2, order=order, tol_scope="example")
    results = {}
    with torch.no_grad():
        for engine in ("auto", "0"):
            monkeypatch.setenv("EPRUN_NATIVE", engine)
            native.reset()
            free, free_steps = relax(net, x, y, 120, **schedule)
            assert net.last_relax_engine == ("native" if engine == "auto" else "torch")
            nudged, nudged_steps = relax(net, x, y, 40, 0.5, free, **schedule)
            results[engine] = (free + nudged, free_steps, nudged_steps)
        relax(net, x, y, 120, **{**schedule, "tol_scope": "batch"})
        assert net.last_relax_engine == "torch"
    (ours, ours_free, ours_nudged), (theirs, theirs_free, theirs_nudged) = results["auto"], results["0"]
    assert ours_free == theirs_free and ours_nudged == theirs_nudged
    assert ours_free < 120 and not float(ours_free).is_integer()  # examples stopped at different steps
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "tanh"])
def test_native_row_steps_and_a_nan_row(activation):
    """The kernel reports the steps of each row; a NaN in a row's constant stays NaN through g
    (as on torch) and keeps that row running all its steps, while the others stop."""
    torch.manual_seed(0)
    W = torch.randn(4, 16) * 0.3
    const = torch.randn(10, 16)
    const[3, 5] = float("nan")
    state = [torch.zeros(10, 16), torch.zeros(10, 4)]
    taken = native.dense.relax_dense(state, [const, torch.zeros(4)], [None, W], [W.contiguous(), None], 1.0, activation, 0.0,
                               80, "sync", tol=1e-5, check_every=4)
    assert taken.dtype == torch.int32 and taken[3] == 80
    others = torch.cat([taken[:3], taken[4:]])
    assert (others < 80).all() and (others % 4 == 0).all()
    assert math.isnan(float(state[0][3, 5]))
    assert not state[0][torch.arange(10) != 3].isnan().any()


def test_recipe_key_reaches_the_relaxation(tiny_recipe, tmp_path):
    """``rule.tol_scope: example`` trains and logs the mean steps per example; another value is
    refused with the key path and the values allowed."""
    import json

    from eprun.errors import RecipeError
    from eprun.recipe import load_recipe
    from eprun.runner import train

    with pytest.raises(RecipeError, match=r"rule\.tol_scope.*batch.*example"):
        load_recipe(tiny_recipe, ["rule.tol_scope=layer"])
    recipe = load_recipe(tiny_recipe, ["rule.tol=1e-3", "rule.tol_scope=example", "rule.T=40", "rule.K=20",
                                       "train.epochs=1", "train.max_batches=6", "train.log_every=3"])
    run = train(recipe, tmp_path / "runs", quiet=True)
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]
    assert records and all(0 < r["relax_steps_free"] < 40 and 0 < r["relax_steps_nudged"] <= 20 for r in records)
