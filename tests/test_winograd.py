"""Winograd's F(4 × 4, 5 × 5): the matrices, the torch reference and the compiled convolution with
its fused 2 × 2 max pooling (``winograd_conv_pool.c``), against torch's convolution."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from eprun import native
from eprun.nets import winograd
from eprun.nets.conv import ConvConfig, ConvNet

pytestmark = pytest.mark.native  # also run on the forced AVX2 build in CI (.ci/run)


@pytest.fixture(autouse=True)
def fresh_native_state():
    native.reset()
    yield
    native.reset()


needs_kernel = pytest.mark.skipif(not native.conv.winograd_conv_pool_available(5, 1, 2, (8, 8), 32, 64),
                                  reason="the compiled Winograd convolution did not build")


def _layer(batch, channels_in, channels_out, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(batch, channels_in, side, side, generator=g)
    weight = (torch.rand(channels_out, channels_in, 5, 5, generator=g) - 0.5) * (2 / (25 * channels_in) ** 0.5)
    return s, weight


def test_the_matrices_compute_a_correlation_exactly():
    """y = Aᵀ[(G w) ⊙ (Bᵀ d)] is the valid correlation of d (8) with w (5), in exact arithmetic."""
    a_t, g, b_t = winograd.matrices()
    gen = torch.Generator().manual_seed(0)
    d, w = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    want = torch.stack([sum(d[i + k] * w[k] for k in range(5)) for i in range(4)])
    torch.testing.assert_close(a_t @ ((g @ w) * (b_t @ d)), want, rtol=0, atol=1e-12)
    # the Cook–Toom construction: Bᵀ E_8 = I with E_8 the evaluation matrix of the points
    e8 = torch.tensor([[float(p ** j) for j in range(8)] for p in winograd.POINTS] + [[0.0] * 7 + [1.0]],
                      dtype=torch.float64)
    torch.testing.assert_close(b_t.T @ e8, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert winograd.POINTS[5] == Fraction(1, 2)


@pytest.mark.parametrize("padding,side", [(0, 12), (2, 8), (1, 10)])
def test_reference_conv_is_the_convolution(padding, side):
    s, weight = _layer(2, 3, 4, side)
    want = F.conv2d(s.double(), weight.double(), padding=padding)
    torch.testing.assert_close(winograd.reference_conv(s.double(), weight.double(), padding), want,
                               rtol=0, atol=1e-12)
    # float32: the transforms' round-off stays a few times a direct convolution's
    got = winograd.reference_conv(s, weight, padding)
    assert float((got.double() - want).abs().max()) < 2e-5


def _compiled(s, weight, padding=0, fill=7.0):
    batch, _, h, w = s.shape
    shape = (batch, weight.shape[0], (h + 2 * padding - 4) // 2, (w + 2 * padding - 4) // 2)
    pooled = torch.full(shape, fill).contiguous(memory_format=torch.channels_last)
    indices = torch.full(shape, -1, dtype=torch.int64).contiguous(memory_format=torch.channels_last)
    done = native.conv.winograd_conv_pool(s.contiguous(memory_format=torch.channels_last),
                                     winograd.transform_weights(weight), padding, pooled, indices)
    return done, pooled, indices


@needs_kernel
@pytest.mark.parametrize("batch,channels_in,channels_out,side,padding", [
    (100, 32, 64, 12, 0),  # the MNIST net's second layer
    (1, 16, 64, 12, 0),  # one example: a block of 4 tiles, a product over fewer than 6
    (7, 32, 128, 8, 2),  # padding, two blocks of output channels
    (3, 16, 64, 20, 0),  # 16 tiles an example
])
def test_compiled_conv_pool_matches_torch(batch, channels_in, channels_out, side, padding):
    """Pooled values equal torch's conv2d + max_pool2d to rounding; the indices are torch's
    wherever the window's largest value leads the next by more than the rounding."""
    s, weight = _layer(batch, channels_in, channels_out, side)
    done, pooled, indices = _compiled(s, weight, padding)
    assert done
    z = F.conv2d(s.double(), weight.double(), padding=padding)
    want, want_indices = F.max_pool2d(z, 2, 2, return_indices=True)
    torch.testing.assert_close(pooled.double(), want, rtol=0, atol=2e-5)
    windows = F.unfold(z, 2, stride=2).view(batch, channels_out, 4, -1).sort(dim=2, descending=True).values
    clear = (windows[:, :, 0] - windows[:, :, 1]).view_as(want) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(indices[clear], want_indices[clear])


@needs_kernel
def test_ties_and_nan_follow_max_pool2d():
    """An all-zero input gives z = 0 exactly: every window ties and takes its top-left position.
    A NaN in the input makes every window NaN whose z it reaches, as max_pool2d does (and, mixed
    in by the transforms, the rest of its 4 × 4 tiles: a diverged state stays visible)."""
    s, weight = _layer(2, 32, 64, 12)
    s[0] = 0.0
    s[1, 3, 5, 5] = float("nan")
    done, pooled, indices = _compiled(s, weight)
    assert done
    want, want_indices = F.max_pool2d(F.conv2d(s, weight), 2, 2, return_indices=True)
    assert torch.equal(pooled[0], torch.zeros_like(pooled[0]))
    assert torch.equal(indices[0], want_indices[0])
    assert bool(want[1].isnan().any()) and bool(pooled[1][want[1].isnan()].isnan().all())


@needs_kernel
def test_split_over_threads_changes_no_bit():
    s, weight = _layer(37, 32, 64, 12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _compiled(s, weight)
        torch.set_num_threads(2)
        two = _compiled(s, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], two[1]) and torch.equal(one[2], two[2])


@needs_kernel
def test_other_geometries_and_tensors_are_refused_untouched():
    s, weight = _layer(2, 32, 64, 12)
    assert not native.conv.winograd_conv_pool_available(3, 1, 2, (8, 8), 32, 64)  # 3×3 kernel
    assert not native.conv.winograd_conv_pool_available(5, 2, 2, (8, 8), 32, 64)  # stride 2
    assert not native.conv.winograd_conv_pool_available(5, 1, 3, (8, 8), 32, 64)  # 3×3 pooling
    assert not native.conv.winograd_conv_pool_available(5, 1, 2, (6, 6), 32, 64)  # z not in 4×4 tiles
    assert not native.conv.winograd_conv_pool_available(5, 1, 2, (8, 8), 24, 64)  # ci not a multiple of 16
    assert not native.conv.winograd_conv_pool_available(5, 1, 2, (8, 8), 32, 48)  # co not a multiple of 64
    done, pooled, indices = _compiled(s.double(), weight)  # float64
    assert not done and bool((pooled == 7.0).all()) and bool((indices == -1).all())
    shape = (2, 64, 4, 4)
    pooled, indices = torch.full(shape, 7.0), torch.full(shape, -1, dtype=torch.int64)  # not channels-last
    assert not native.conv.winograd_conv_pool(s.contiguous(memory_format=torch.channels_last),
                                         winograd.transform_weights(weight), 0, pooled, indices)
    assert not native.conv.winograd_conv_pool(s, winograd.transform_weights(weight), 0,  # s not channels-last
                                         pooled.contiguous(memory_format=torch.channels_last),
                                         indices.contiguous(memory_format=torch.channels_last))
    assert bool((pooled == 7.0).all())


# --------------------------------------------------------------------------- inside ConvNet.relax


def _mnist_net(activation="hard_sigmoid"):
    cfg = ConvConfig(channels=[32, 64], kernels=5, paddings=0, pools="max", fc=[10], activation=activation)
    return ConvNet(cfg, (1, 28, 28), 10, torch.Generator().manual_seed(0))


def _relaxed(net, monkeypatch, mode, steps=8, beta=0.0, order="sync"):
    monkeypatch.setenv("EPRUN_NATIVE", mode)
    native.reset()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 28, 28, generator=g)
    target = net.target(torch.tensor([0, 3, 1, 9, 2]), x)
    state = [torch.rand(5, *shape, generator=g) for shape in net.state_shapes]
    with torch.no_grad():
        net.relax(net.input_drive(x), state, steps, beta, target, order=order)
    return state


@needs_kernel
@pytest.mark.parametrize("order", ["sync", "async"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_relax_through_the_winograd_convolution_matches_the_torch_path(order, beta, monkeypatch):
    """The MNIST net (its W_1 ⋆ s¹ goes through the Winograd kernel) against EPRUN_NATIVE=0."""
    net = _mnist_net()
    calls = []
    original = native.conv.winograd_conv_pool
    monkeypatch.setattr(native.conv, "winograd_conv_pool", lambda *a: calls.append(1) or original(*a))
    ours = _relaxed(net, monkeypatch, "auto", beta=beta, order=order)
    assert calls
    theirs = _relaxed(net, monkeypatch, "0", beta=beta, order=order)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@needs_kernel
def test_transformed_weights_follow_the_optimiser(monkeypatch):
    """The relaxation uses the current W_1 after an optimiser step, including a fused one (which
    changes the parameter in place without bumping its version counter)."""
    net = _mnist_net()
    before = _relaxed(net, monkeypatch, "auto")
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0, fused=True)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.05)
    optimizer.step()
    after = _relaxed(net, monkeypatch, "auto")
    reference = _relaxed(net, monkeypatch, "0")
    for a, b in zip(after, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert not torch.allclose(before[1], after[1])
