"""The compiled top-down term of max-pooled conv layers (``unpool_conv_t.c``) against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eprun import native
from eprun.nets.conv import ConvConfig, ConvNet
from eprun.nets.pooling import max_pool_with_indices
from eprun.nets.vf_conv import VectorFieldConvNet, VFConvConfig

pytestmark = pytest.mark.native  # also run on the forced AVX2 build in CI (.ci/run)

# (kernel, padding, s^n's side, its channels): the geometries unpool_conv_t.c instantiates
GEOMETRIES = [(5, 0, 12, 32), (3, 1, 16, 128), (3, 1, 8, 256), (3, 0, 4, 512)]


@pytest.fixture(autouse=True)
def fresh_native_state():
    native.reset()
    yield
    native.reset()


def _compiled(kernel, padding, side, channels) -> bool:
    z_side = side + 2 * padding - kernel + 1
    return native.conv.unpool_conv_t_available(kernel, 1, padding, z_side, side, channels)


needs_kernel = pytest.mark.skipif(not _compiled(5, 0, 12, 32),
                                  reason="the compiled transposed convolution needs an AVX-512 build")


def _layer(batch, kernel, padding, side, channels, above_channels=6, zeros=0.3, seed=0, channels_last=True):
    """s^n, W_n, and s^{n+1} (a fraction ``zeros`` of it exactly 0) with the argmax of W_n ⋆ s^n."""
    g = torch.Generator().manual_seed(seed)
    below = torch.rand(batch, channels, side, side, generator=g)
    weight = torch.randn(above_channels, channels, kernel, kernel, generator=g) * 0.1
    z = F.conv2d(below, weight, padding=padding)
    pooled, indices = max_pool_with_indices(z, 2, keep_channels_last=channels_last)
    above = torch.rand(pooled.shape, generator=g)
    above[torch.rand(pooled.shape, generator=g) < zeros] = 0.0
    return above, indices, weight, tuple(z.shape[2:])


def _torch_top_down(above, indices, weight, z_size, padding):
    return F.conv_transpose2d(F.max_unpool2d(above, indices.contiguous(), 2, 2, output_size=z_size), weight,
                              padding=padding)


def _run(above, indices, weight, z_size, side, padding, base=None, alpha=1.0, clamp01=False):
    out = torch.full((above.shape[0], side, side, weight.shape[1]), float("nan"))
    weight_r = weight.permute(2, 0, 3, 1).contiguous()
    assert native.conv.unpool_conv_t(above, indices, weight_r, z_size, (side, side), padding, out, base, alpha, clamp01)
    return out.permute(0, 3, 1, 2)


@needs_kernel
@pytest.mark.parametrize("kernel,padding,side,channels", GEOMETRIES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("zeros", [0.0, 0.4, 1.0])
def test_matches_unpool_then_transposed_convolution(kernel, padding, side, channels, channels_last, zeros):
    """Wᵀ ⋆ Pᵀ(s) from the nonzeros equals torch's max_unpool2d + conv_transpose2d to rounding, for
    every compiled geometry, indices in either layout, and s with no, some or only zeros."""
    assert _compiled(kernel, padding, side, channels)
    above, indices, weight, z_size = _layer(3, kernel, padding, side, channels, zeros=zeros,
                                            channels_last=channels_last)
    want = _torch_top_down(above, indices, weight, z_size, padding)
    got = _run(above, indices, weight, z_size, side, padding)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6 * max(1.0, float(want.abs().max())))


@needs_kernel
@pytest.mark.parametrize("clamp01", [False, True])
def test_fused_update_is_base_plus_alpha_times_the_term_then_clamped(clamp01):
    above, indices, weight, z_size = _layer(4, 5, 0, 12, 32)
    base = torch.randn(4, 12, 12, 32, generator=torch.Generator().manual_seed(3))
    want = base.permute(0, 3, 1, 2) + 0.7 * _torch_top_down(above, indices, weight, z_size, 0)
    if clamp01:
        want = want.clamp(0.0, 1.0)
        assert 0 < int((want == 0).sum()) and 0 < int((want == 1).sum())  # both bounds are met
    got = _run(above, indices, weight, z_size, 12, 0, base, 0.7, clamp01)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@needs_kernel
def test_split_over_threads_changes_no_bit():
    above, indices, weight, z_size = _layer(9, 5, 0, 12, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(above, indices, weight, z_size, 12, 0)
        torch.set_num_threads(2)
        two = _run(above, indices, weight, z_size, 12, 0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_other_geometries_and_tensors_are_refused_untouched():
    above, indices, weight, z_size = _layer(2, 5, 0, 12, 32)
    weight_r = weight.permute(2, 0, 3, 1).contiguous()
    out = torch.full((2, 12, 12, 32), 7.0)
    assert not native.conv.unpool_conv_t_available(5, 2, 0, 8, 12, 32)  # stride 2
    assert not native.conv.unpool_conv_t_available(5, 1, 0, 8, 12, 48)  # channels not instantiated
    assert not native.conv.unpool_conv_t(above.double(), indices, weight_r, z_size, (12, 12), 0, out)  # float64
    assert not native.conv.unpool_conv_t(above, indices.int(), weight_r, z_size, (12, 12), 0, out)  # int32 indices
    assert not native.conv.unpool_conv_t(above, indices, weight_r, z_size, (12, 12), 0, out.permute(0, 3, 1, 2))
    assert not native.conv.unpool_conv_t(above, indices, weight_r, z_size, (12, 12), 0, out, base=torch.ones(1))
    assert torch.equal(out, torch.full((2, 12, 12, 32), 7.0))


# --------------------------------------------------------------------------- inside ConvNet.relax


def _mnist_like(activation, channels=(32, 5), kind="conv", nudge="pre_activation"):
    """Ernoult et al. 2019's geometry (5×5 kernels, 28×28 input: the top-down term into the
    32-channel s¹ is compiled) with a narrow second layer."""
    common = dict(channels=list(channels), kernels=5, paddings=0, pools="max", fc=[4], activation=activation,
                  nudge=nudge)
    if kind == "vf":
        return VectorFieldConvNet(VFConvConfig(**common, initial_angle=30.0), (1, 28, 28), 4,
                                  torch.Generator().manual_seed(0))
    return ConvNet(ConvConfig(**common), (1, 28, 28), 4, torch.Generator().manual_seed(0))


def _three_conv_layers(activation):
    """3×3 padded layers 8-256-4 on 3×32×32: the term into the 256-channel s² (8×8, the CIFAR-10
    net's third layer) is compiled, the one into the 8-channel s¹ is not."""
    cfg = ConvConfig(channels=[8, 256, 4], kernels=3, paddings=1, pools="max", fc=[4], activation=activation)
    return ConvNet(cfg, (3, 32, 32), 4, torch.Generator().manual_seed(0))


def _start(net):
    """The input, target and initial state the relaxations below start from."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, *net.input_shape, generator=g)
    target = net.target(torch.tensor([0, 3, 1]), x)
    state = [torch.rand(3, *shape, generator=g) for shape in net.state_shapes]
    state[0][:, :, :2] = 0.0  # saturated units: exact zeros on the way up and down
    return x, target, state


def _relaxed(net, monkeypatch, compiled, steps=6, beta=0.0, order="sync", start=None, **schedule):
    monkeypatch.setenv("EPRUN_NATIVE", "auto" if compiled else "0")
    native.reset()
    x, target, state = start if start is not None else _start(net)
    state = [s.clone() for s in state]
    ids = [id(s) for s in state]
    with torch.no_grad():
        drive = net.input_drive(x)
        net.relax(drive, state, steps, beta, target, order=order, **schedule)
    assert [id(s) for s in state] == ids and all(s.is_contiguous() for s in state)
    return state, net.last_relax_engine


@needs_kernel
@pytest.mark.parametrize("activation", ["hard_sigmoid", "hard_sigmoid_half", "sigmoid"])
@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("make", [_mnist_like, _three_conv_layers])
def test_relax_with_the_compiled_term_matches_the_torch_path(make, activation, order, beta, monkeypatch):
    """Free and nudged, both schedules, the hard sigmoids (clamp fused into the kernel) and the
    logistic one (applied after it), a compiled term into the first layer or into a middle one.

    Six steps, each from the torch path's state of the step before: the step maps are compared,
    not trajectories. Over several steps the two paths' rounding (float32 sums in another order)
    can decide a near-tie of a max-pooling window the other way, and from then on the top-down
    term goes to another unit (docs/reliability.md, "Compiled and torch conv relaxations")."""
    net = make(activation)
    x, target, state = _start(net)
    for _ in range(6):
        ours, engine = _relaxed(net, monkeypatch, True, steps=1, beta=beta, order=order, start=(x, target, state))
        assert engine == "torch+native"
        state, engine = _relaxed(net, monkeypatch, False, steps=1, beta=beta, order=order, start=(x, target, state))
        assert engine == "torch"
        for a, b in zip(ours, state):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("kind", ["conv", "vf"])
def test_the_nudge_after_sigma_relaxes_alike_on_both_paths(kind, monkeypatch):
    """``nudge: post_activation`` on P-conv's geometry: the compiled path's nudged steps are the
    torch path's (the nudge is added to the output layer after both have computed σ(z^N))."""
    net = _mnist_like("hard_sigmoid", kind=kind, nudge="post_activation")
    x, target, state = _start(net)
    for _ in range(6):
        ours, engine = _relaxed(net, monkeypatch, True, steps=1, beta=0.5, start=(x, target, state))
        assert engine == "torch+native"
        state, _ = _relaxed(net, monkeypatch, False, steps=1, beta=0.5, start=(x, target, state))
        for a, b in zip(ours, state):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_kernel
def test_relax_with_the_compiled_term_follows_the_float64_reference_step(monkeypatch):
    """The float32 compiled relaxation against ConvNet.step in float64 (the step is tested against
    autograd of Φ in test_conv.py): equal to float32 rounding after 5 steps."""
    net = _mnist_like("hard_sigmoid")
    ours, _ = _relaxed(net, monkeypatch, True, steps=5)
    g = torch.Generator().manual_seed(1)
    net64 = _mnist_like("hard_sigmoid").double()
    x = torch.rand(3, *net.input_shape, generator=g).double()
    state = [torch.rand(3, *shape, generator=g).double() for shape in net.state_shapes]
    state[0][:, :, :2] = 0.0
    with torch.no_grad():
        term = net64.input_term(x)
        for _ in range(5):
            state = net64.step(x, state, input_term=term)
    for a, b in zip(ours, state):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5)


@needs_kernel
def test_vector_field_net_sends_its_backward_kernel_down(monkeypatch):
    net = _mnist_like("hard_sigmoid", kind="vf")
    ours, engine = _relaxed(net, monkeypatch, True)
    assert engine == "torch+native"
    theirs, _ = _relaxed(net, monkeypatch, False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_kernel
def test_per_example_early_stop_runs_through_the_compiled_term(monkeypatch):
    net = _mnist_like("hard_sigmoid")
    schedule = dict(tol=1e-3, check_every=2, tol_scope="example")
    ours, _ = _relaxed(net, monkeypatch, True, steps=12, **schedule)
    steps_ours = net.last_relax_steps
    theirs, _ = _relaxed(net, monkeypatch, False, steps=12, **schedule)
    assert steps_ours == net.last_relax_steps
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_geometries_without_a_compiled_kernel_relax_on_torch(monkeypatch):
    net = _mnist_like("hard_sigmoid", channels=(8, 5))  # an 8-channel s¹: not instantiated
    _, engine = _relaxed(net, monkeypatch, True)
    assert engine == "torch"
