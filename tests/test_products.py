"""eprun.nets.products.linear: x·Wᵀ + b through oneDNN or addmm, the same within rounding."""

from __future__ import annotations

import pytest
import torch

from eprun.nets import products

pytestmark = pytest.mark.native  # also run on the forced AVX2 build in CI (.ci/run)


@pytest.fixture(autouse=True)
def fresh_setting():
    products.reset()
    yield
    products.reset()


def _operands(batch=7, n_in=300, n_out=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, n_in, generator=g), torch.randn(n_out, n_in, generator=g) * 0.05,
            torch.randn(n_out, generator=g))


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_is_x_wt_plus_b(with_bias):
    x, w, b = _operands()
    bias = b if with_bias else None
    with torch.no_grad():
        ours = products.linear(x, w, bias)
    exact = x.double() @ w.double().T + (b.double() if with_bias else 0.0)
    assert ours.shape == (7, 256) and ours.dtype == torch.float32
    assert float((ours.double() - exact).abs().max()) < 1e-5


def test_onednn_is_used_when_available_and_off_by_setting(monkeypatch):
    """With oneDNN in this torch, a float32 product of a large weight goes through it; with
    EPRUN_ONEDNN=0 the result is torch.addmm's, bit for bit."""
    x, w, b = _operands()
    status = products.onednn_status()
    if not status["onednn"]:
        pytest.skip(f"no oneDNN here: {status['reason']}")
    monkeypatch.setenv("EPRUN_ONEDNN", "0")
    products.reset()
    with torch.no_grad():
        assert torch.equal(products.linear(x, w, b), torch.addmm(b, x, w.T))
    assert products.onednn_status() == {"onednn": False, "reason": "EPRUN_ONEDNN=0"}


def test_small_weights_autograd_and_other_dtypes_use_addmm():
    """Below MIN_WEIGHT elements, with autograd on, or in float64, the product is addmm's exactly
    (and keeps its graph)."""
    x, w, b = _operands(n_in=20, n_out=30)
    with torch.no_grad():
        assert torch.equal(products.linear(x, w, b), torch.addmm(b, x, w.T))
    x, w, b = _operands()
    w.requires_grad_(True)
    out = products.linear(x, w, b)
    assert out.requires_grad and torch.equal(out, torch.addmm(b, x, w.T))
    x64, w64, b64 = x.double(), w.detach().double(), b.double()
    with torch.no_grad():
        assert torch.equal(products.linear(x64, w64, b64), torch.addmm(b64, x64, w64.T))


@pytest.mark.parametrize("shape", [(50, 512, 784), (7, 13, 45), (3, 1, 17), (60, 12, 16)])
def test_add_outer_is_g_plus_alpha_at_x(shape):
    """out += α·aᵀx, compiled (AVX-512 builds) or addmm_: within float32 rounding of float64,
    whole tiles and tails of rows and columns."""
    batch, n, m = shape
    g = torch.Generator().manual_seed(2)
    a, x, out = torch.randn(batch, n, generator=g), torch.rand(batch, m, generator=g), torch.randn(n, m, generator=g)
    exact = out.double() + 0.3 * a.double().T @ x.double()
    with torch.no_grad():
        result = products.add_outer_(out, a, x, 0.3)
    assert result is out
    assert float((out.double() - exact).abs().max()) < 1e-5


def test_add_outer_split_over_threads_changes_no_bit():
    """Each element of G belongs to one thread and sums the batch in order: 1 and 2 threads agree
    bit for bit."""
    from eprun import native

    if not native.dense.add_outer_available():
        pytest.skip("no AVX-512 build of the kernel here")
    g = torch.Generator().manual_seed(3)
    a, x, start = torch.randn(50, 77, generator=g), torch.rand(50, 101, generator=g), torch.randn(77, 101, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = start.clone()
            assert native.dense.add_outer_(out, a, x, 0.7)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_add_outer_declines_what_it_cannot_take():
    """The compiled product takes float32, contiguous CPU tensors of matching shapes only; anything
    else is left to addmm_ (native.dense.add_outer_ returns False and writes nothing)."""
    from eprun import native

    a, x, out = torch.randn(5, 8), torch.rand(5, 9), torch.zeros(8, 9)
    for args in ((out, a.double(), x), (out, torch.randn(8, 5).T, x), (torch.zeros(8, 10), a, x),
                 (out, a, torch.rand(4, 9))):
        assert native.dense.add_outer_(*args, 1.0) is False
    assert torch.equal(out, torch.zeros(8, 9))


# ----------------------------------------------------------------------------- the guard around the private oneDNN op


@pytest.fixture
def fresh_products():
    products.reset()
    yield
    products.reset()


def _product_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.rand(4, 300, generator=g), torch.rand(256, 300, generator=g) - 0.5, torch.rand(256, generator=g)


def test_a_missing_onednn_op_falls_back_to_addmm(fresh_products, monkeypatch):
    monkeypatch.setattr(torch.ops, "mkldnn", object())
    state = products.onednn_status()
    assert state["onednn"] is False and "no oneDNN linear op" in state["reason"]
    x, w, b = _product_inputs()
    with torch.no_grad():
        assert torch.equal(products.linear(x, w, b), torch.addmm(b, x, w.T))


def test_a_onednn_op_that_gives_another_result_falls_back(fresh_products, monkeypatch):
    real = torch.ops.mkldnn._linear_pointwise

    class Changed:
        _linear_pointwise = staticmethod(lambda x, w, b, *rest: real(x, w, b, *rest) * 2)

    monkeypatch.setattr(torch.ops, "mkldnn", Changed())
    state = products.onednn_status()
    assert state["onednn"] is False and "did not give addmm's result" in state["reason"]
    x, w, b = _product_inputs()
    with torch.no_grad():
        assert torch.equal(products.linear(x, w, b), torch.addmm(b, x, w.T))
