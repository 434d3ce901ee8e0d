"""The dense nets' two large products a batch, through faster engines where they apply.

**x·Wᵀ + b** (:func:`linear`): the input drive a·(W₀x + b₁) + c of a dense net is its one large
product per batch, shared by every phase. torch sends a float32 ``addmm`` to MKL, whose
kernels on AMD CPUs are its AVX2 ones even where the CPU has AVX-512; oneDNN, also inside torch
(its convolutions use it), picks its kernels from the instruction set alone. :func:`linear` uses
oneDNN's linear op for float32 CPU tensors without autograd when the weight is large enough for
the call's fixed cost to be worth it, and ``torch.addmm`` otherwise, or when ``EPRUN_ONEDNN=0``.

The oneDNN op is a private operator of torch (``torch.ops.mkldnn._linear_pointwise``): it is
used only after a check, once per process, that it exists and gives ``addmm``'s result on a
small product (to float32 rounding); a missing op, an error or a different result switches to
``addmm`` for the rest of the process, and :func:`onednn_status` says why. The choice depends on
the tensors and that check only, never on a timing, so the same run gives the same numbers each
time. The two differ by float32 rounding (summation order).

**G += α·aᵀx** (:func:`add_outer_`): EP's update of the first weight matrix, through the
compiled kernel of :mod:`eprun.native.dense` where it applies, else ``addmm_``.
"""

from __future__ import annotations

import os

import torch

from eprun.native import dense as native_dense

MIN_WEIGHT = 1 << 16  # elements of W from which oneDNN is used (its call costs more than addmm's)

_state: dict = {}  # "ok": bool once decided, "reason": why not


def onednn_status() -> dict:
    """Whether :func:`linear` uses oneDNN here, or why not (``env.json`` records it)."""
    return {"onednn": _usable(), "reason": _state.get("reason")}


def reset() -> None:
    """Read ``EPRUN_ONEDNN`` and check the op again at the next call."""
    _state.clear()


def _onednn_linear():
    """The private oneDNN linear op, or None with the reason recorded."""
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError) as error:
        _state.update(ok=False, reason=f"no oneDNN linear op in this torch: {error}")
        return None


def _agrees_with_addmm(op) -> bool:
    """The op gives addmm's x·Wᵀ + b on a seeded product above :data:`MIN_WEIGHT` (to float32
    rounding), or the reason it does not is recorded."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 384, generator=g)
    w = torch.rand(192, 384, generator=g) - 0.5
    b = torch.rand(192, generator=g)
    try:
        with torch.no_grad():
            got = op(x, w, b, "none", [], "")
    except (RuntimeError, TypeError) as error:
        _state.update(ok=False, reason=f"oneDNN linear failed: {str(error)[:200]}")
        return False
    want = torch.addmm(b, x, w.T)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        _state.update(ok=False, reason="oneDNN linear did not give addmm's result on the check product")
        return False
    return True


def _usable() -> bool:
    if "ok" not in _state:
        setting = os.environ.get("EPRUN_ONEDNN", "auto").strip().lower()
        if setting in ("0", "off", "false", "no"):
            _state.update(ok=False, reason="EPRUN_ONEDNN=0")
        elif not torch.backends.mkldnn.is_available():
            _state.update(ok=False, reason="this torch was built without oneDNN")
        else:
            op = _onednn_linear()
            if op is not None and _agrees_with_addmm(op):
                _state.update(ok=True, reason=None, op=op)
    return _state["ok"]


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (x.dim() == 2 and weight.numel() >= MIN_WEIGHT and not torch.is_grad_enabled()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b for x [batch, in], W [out, in], b [out] (a new tensor)."""
    if _fits(x, weight, bias) and _usable():
        try:
            return _state["op"](x, weight, bias, "none", [], "")
        except RuntimeError as error:  # an op that refuses these tensors: addmm from now on
            _state.update(ok=False, reason=f"oneDNN linear failed: {str(error)[:200]}")
    if bias is None:
        return x @ weight.T
    return torch.addmm(bias, x, weight.T)


def add_outer_(out: torch.Tensor, a: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """out += α · aᵀ x  for out [n, m], a [batch, n], x [batch, m]; returns out."""
    if not torch.is_grad_enabled() and native_dense.add_outer_(out, a, x, alpha):
        return out
    return out.addmm_(a.T, x, alpha=alpha)
