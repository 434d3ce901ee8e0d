"""The dense nets' two large products a batch, on the CPU faster than torch's BLAS here.

**x·Wᵀ + b** (:func:`linear`) through oneDNN, where torch's BLAS takes a narrower path.

The input drive a·(W₀x + b₁) + c of a dense net is its one large product per batch (batch 50,
784 → 512: 40 MFLOP, once per batch and shared by every phase). torch sends a float32 ``addmm``
to MKL, whose kernels on AMD CPUs are its AVX2 ones even where the CPU has AVX-512; oneDNN, also
inside torch (its convolutions use it), picks its kernels from the instruction set alone. On 2
cores of an AMD EPYC with AVX-512 the drive takes 0.29–0.32 ms through ``addmm`` and 0.16–0.18 ms
through oneDNN (``[EPRUN_ONEDNN=0] python -m benchmarks.mlp_breakdown --threads 2``, "input
drive" row, two runs each, alternating).

:func:`linear` uses oneDNN for float32 CPU tensors without autograd when the weight is large
enough for the call's fixed cost to be worth it, and ``torch.addmm`` otherwise, or when
``EPRUN_ONEDNN=0``, or when this torch has no oneDNN. The choice depends on the tensors and the
setting only, never on a timing, so the same run gives the same numbers each time. The two
differ by float32 rounding (summation order).

**G += α·aᵀx** (:func:`add_outer_`): EP's update of the first weight matrix, a the difference of
the first hidden layer's states between two phases and x the input. Its inner dimension is the
batch (50), so the product is mostly reading and writing G; the compiled kernel of
:mod:`eprun.native` (AVX-512 builds) does it in 8×32 tiles. The whole update of the 784-512-10 net
at batch 50 on 2 cores, the small products and sums included: 0.25–0.28 ms with addmm_, 0.15–0.18
ms with the kernel (``python -m benchmarks.mlp_breakdown --threads 2``, "update into .grad" row,
torch and native columns). Elsewhere, with autograd, or with ``EPRUN_NATIVE=0``, addmm_.
"""

from __future__ import annotations

import os

import torch

from eprun import native

MIN_WEIGHT = 1 << 16  # elements of W from which oneDNN is used (its call costs ~20 µs more than addmm's)

_state: dict = {}  # "ok": bool once decided, "reason": why not


def onednn_status() -> dict:
    """Whether :func:`linear` uses oneDNN here, or why not (``env.json`` records it)."""
    return {"onednn": _usable(), "reason": _state.get("reason")}


def reset() -> None:
    """Read ``EPRUN_ONEDNN`` and check for the op again at the next call."""
    _state.clear()


def _usable() -> bool:
    if "ok" not in _state:
        setting = os.environ.get("EPRUN_ONEDNN", "auto").strip().lower()
        if setting in ("0", "off", "false", "no"):
            _state.update(ok=False, reason="EPRUN_ONEDNN=0")
        elif not torch.backends.mkldnn.is_available():
            _state.update(ok=False, reason="this torch was built without oneDNN")
        else:
            try:
                torch.ops.mkldnn._linear_pointwise  # noqa: B018  (raises if the op is missing)
                _state.update(ok=True, reason=None)
            except (AttributeError, RuntimeError) as error:
                _state.update(ok=False, reason=f"no oneDNN linear op in this torch: {error}")
    return _state["ok"]


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (x.dim() == 2 and weight.numel() >= MIN_WEIGHT and not torch.is_grad_enabled()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x·Wᵀ + b for x [batch, in], W [out, in], b [out] (a new tensor)."""
    if _fits(x, weight, bias) and _usable():
        try:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        except RuntimeError as error:  # an op that exists but refuses: addmm from now on
            _state.update(ok=False, reason=f"oneDNN linear failed: {str(error)[:200]}")
    if bias is None:
        return x @ weight.T
    return torch.addmm(bias, x, weight.T)


def add_outer_(out: torch.Tensor, a: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """out += α · aᵀ x  for out [n, m], a [batch, n], x [batch, m]; returns out."""
    if not torch.is_grad_enabled() and native.add_outer_(out, a, x, alpha):
        return out
    return out.addmm_(a.T, x, alpha=alpha)
