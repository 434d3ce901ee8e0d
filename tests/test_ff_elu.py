"""The target propagation nets' ELU (eprun/nets/elu.py): on the CPU it is computed through exp,
elsewhere it is ``F.elu``; the two must agree in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eprun.nets.elu import elu
from eprun.nets.feedforward import FF_ACTIVATIONS, ConvLayer
from eprun.nets.pooling import max_pool_with_indices

HALF_ULP_OF_ONE = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def points(dtype: torch.dtype) -> torch.Tensor:
    """Random values over the ELU's whole range, the tiny ones where e^z − 1 loses its digits,
    and the edges (0, ±tiny, large negative)."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(20_000, generator=g, dtype=torch.float64) * 4
    tiny = torch.randn(5_000, generator=g, dtype=torch.float64) * 1e-5
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, -1e-8, 1e-8, -40.0, -200.0, 50.0], dtype=torch.float64)
    return torch.cat([wide, tiny, edges]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_elu_is_torchs_to_half_an_ulp_of_one(dtype):
    z = points(dtype)
    exact = F.elu(z.double())  # expm1 in float64
    ours, torchs = elu(z), F.elu(z)
    assert ours.dtype == dtype and ours.shape == z.shape
    tolerance = 2 * HALF_ULP_OF_ONE[dtype]
    assert (ours.double() - exact).abs().max() <= tolerance
    assert (ours.double() - torchs.double()).abs().max() <= tolerance
    positive = z > 0
    assert torch.equal(ours[positive], z[positive])  # z itself, not (z + 1) − 1
    assert (ours[~positive] <= 0).all() and (ours >= -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_elu_gradient_is_torchs(dtype):
    z = points(dtype)
    upstream = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours_in, torchs_in = z.clone().requires_grad_(), z.clone().requires_grad_()
    (elu(ours_in) * upstream).sum().backward()
    (F.elu(torchs_in) * upstream).sum().backward()
    assert torch.allclose(ours_in.grad, torchs_in.grad, rtol=0, atol=4 * HALF_ULP_OF_ONE[dtype])
    at_zero = torch.zeros(3, dtype=dtype, requires_grad=True)
    elu(at_zero).sum().backward()
    assert torch.equal(at_zero.grad, torch.ones(3, dtype=dtype))  # F.elu's σ'(0) = 1


def test_the_cpu_elu_passes_gradcheck():
    z = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    z = z[z.abs() > 1e-3].requires_grad_()  # away from the kink, where finite differences straddle it
    assert torch.autograd.gradcheck(elu, (z,))


def test_the_ff_nets_take_it():
    assert FF_ACTIVATIONS["elu"] is elu


def test_a_conv_layer_is_conv_elu_pool_written_out():
    """F(h) = P(σ(W ⋆ h + b)): the layer's values within the ELU's rounding of F.elu's, its pooling
    indices those of F.max_pool2d on the map (the map large enough for the channels-last pooling)."""
    g = torch.Generator().manual_seed(3)
    layer = ConvLayer((3, 16, 16), 8, 5, 2, "max", "elu", 1.0, g)
    h = torch.randn(20, 3, 16, 16, generator=g)
    with torch.no_grad():
        out, indices = layer.forward_layer(h)
        a = F.elu(F.conv2d(h, layer.weight, layer.bias, padding=2))
        assert a.numel() >= 1 << 14
        expected, expected_indices = F.max_pool2d(a, 2, 2, return_indices=True)
        _, indices_of_ours = max_pool_with_indices(elu(F.conv2d(h, layer.weight, layer.bias, padding=2)), 2)
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(indices, indices_of_ours)
    assert (indices == expected_indices).float().mean() > 0.999  # ties within rounding may swap
    assert out.is_contiguous() and indices.is_contiguous()
