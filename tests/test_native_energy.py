"""The compiled relaxation of the energy-based net (eprun.native.energy) against its torch path."""

from __future__ import annotations

import pytest
import torch

from eprun import native
from eprun.native import build
from eprun.native import energy as native_energy
from eprun.nets.energy_mlp import EnergyMLP, EnergyMLPConfig

pytestmark = [pytest.mark.native,  # also run on the forced AVX2 build in CI (.ci/run)
              pytest.mark.skipif(build.compiler() is None or not set(build.VECTOR_FLAGS) <= build.cpu_flags(),
                                 reason="the compiled kernels need a C compiler and AVX2/FMA")]


@pytest.fixture(autouse=True)
def fresh_native_state(monkeypatch):
    monkeypatch.setenv("EPRUN_NATIVE", "auto")
    native.reset()
    yield
    native.reset()


def make_net(hidden, activation="sigmoid", clamp=True, lateral=False, in_features=29, classes=10, seed=0):
    cfg = EnergyMLPConfig(hidden=list(hidden), activation=activation, dt=0.2, clamp=clamp, lateral=lateral,
                          weight_scale=1.5)
    return EnergyMLP(cfg, (in_features,), classes, torch.Generator().manual_seed(seed))


def relax_both(net, x, y, steps, beta, start=None):
    """(native states, engine), (torch states, engine) from the same start."""
    drive = net.input_drive(x)
    target = net.target(y, x) if beta else None
    out = []
    for mode in ("auto", "0"):
        native.reset()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EPRUN_NATIVE", mode)
            native.reset()
            state = [s.clone() for s in start] if start is not None else net.init_state(x.shape[0], like=x)
            net.relax(drive, state, steps, beta, target)
            out.append((state, net.last_relax_engine))
    native.reset()
    return out


def data(batch, in_features=29, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, in_features, generator=g), torch.randint(0, classes, (batch,), generator=g)


@pytest.mark.parametrize("activation", ["sigmoid", "hard_sigmoid", "hard_sigmoid_half", "tanh"])
@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("hidden", [(37,), (24, 13), (16, 9, 11)])
def test_native_relaxation_equals_the_torch_path(activation, clamp, hidden):
    """Free phase from zero, then nudged phases of either sign from its end: the kernel's states
    equal torch's within float32 rounding, for widths that are and are not multiples of 8 and a
    batch that is not a multiple of the kernel's block."""
    net = make_net(hidden, activation, clamp)
    x, y = data(11)
    (free_n, engine_n), (free_t, engine_t) = relax_both(net, x, y, 40, 0.0)
    assert (engine_n, engine_t) == ("native", "torch")
    for got, want in zip(free_n, free_t):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    for beta in (0.5, -0.3):
        (nudged_n, _), (nudged_t, _) = relax_both(net, x, y, 12, beta, start=free_t)
        for got, want in zip(nudged_n, nudged_t):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    if clamp:
        assert all(0 <= s.min() and s.max() <= 1 for s in free_n)


def test_a_block_stopped_at_its_fixed_point_gives_every_steps_result_to_the_bit():
    """One call of many steps (which stops each block at its bitwise fixed point) against the same
    steps one call at a time (which cannot stop early): equal to the bit; so is a call split into
    chunks between which the relaxation checks for a stop request."""
    net = make_net((20, 12), "hard_sigmoid", clamp=True)
    x, y = data(19)
    drive = net.input_drive(x)
    whole = net.init_state(19, like=x)
    net.relax(drive, whole, 300)
    stepwise = net.init_state(19, like=x)
    for _ in range(300):
        net.relax(drive, stepwise, 1)
    for a, b in zip(whole, stepwise):
        assert torch.equal(a, b)
    chunked = net.init_state(19, like=x)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native_energy, "STEPS_PER_CALL", 7)
        net.relax(drive, chunked, 300)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden", [(30,), (20, 12)])  # the second through the block sums
def test_an_example_does_not_depend_on_its_neighbours(hidden):
    """Row b of a batch relaxed alone or among others (in another block, another position)."""
    net = make_net(hidden, "sigmoid")
    x, y = data(13)
    drive = net.input_drive(x)
    batch = net.init_state(13, like=x)
    net.relax(drive, batch, 25)
    for row in (0, 8, 12):
        alone = net.init_state(1, like=x)
        net.relax(drive[row:row + 1].contiguous(), alone, 25)
        for a, b in zip(batch, alone):
            assert torch.equal(a[row:row + 1], b)


def test_lateral_connections_and_float64_stay_on_torch():
    x, y = data(5)
    net = make_net((12,), lateral=True)
    net.relax(net.input_drive(x), net.init_state(5, like=x), 5)
    assert net.last_relax_engine == "torch"
    net = make_net((12,)).double()
    net.relax(net.input_drive(x.double()), net.init_state(5, like=x.double()), 5)
    assert net.last_relax_engine == "torch"
