"""The arithmetic precision of a run (``train.precision``), set explicitly, never by a library
default.

* ``float32``: every product and convolution in IEEE float32 (TF32 off for cuBLAS and cuDNN).
  What the CPU computes, up to summation order.
* ``tf32``: float32 storage, products and convolutions on the tensor cores' TF32 (a 10-bit
  mantissa for the multiplicands, float32 accumulation). cuDNN's own default, which applied to
  every convolution without a word until the policy was explicit. CUDA only: on the CPU TF32
  does not exist and the setting changes nothing.
* ``bf16``: the products of every relaxation step (the T + K steps of a batch, nearly all of
  its arithmetic) on bfloat16 operands, accumulated in float32 inside the product, the result
  rounded to bfloat16 once and added to float32 (:mod:`eprun.nets.relax_products`)::

      z = c + a·(s @ W)    becomes    z = c + a·bf16(bf16(s) @ bf16(W))

  States, the per-batch input drive, the update −Δθ (a difference of two products divided by
  β: rounding each product would cancel it) and the optimiser stay float32. It applies to the
  rules that relax (ep, cep), on CUDA (the tensor cores) and on the CPU (torch's bfloat16
  kernels: slower there than float32, useful only to study the numerics); the compiled CPU
  kernels and the Triton kernel compute in float32 and step aside.

The TF32 flags are process-wide (torch's); :func:`apply` sets them and the relaxation dtype,
:func:`record` reads them back for ``env.json``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

Precision = Literal["float32", "tf32", "bf16"]
PRECISIONS = ("float32", "tf32", "bf16")

_relax_dtype: list[Optional[torch.dtype]] = [None]  # the operands' dtype of a relaxation's products (None: float32)


def apply(precision: str, device: torch.device) -> None:
    """Set the relaxation's product dtype and, on a CUDA device, torch's TF32 switches for
    ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    _relax_dtype[0] = torch.bfloat16 if precision == "bf16" else None
    # cuBLAS may otherwise reduce a bf16 product's split sums in bf16: the policy is float32 accumulation
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if device.type != "cuda":
        return
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def relax_dtype() -> Optional[torch.dtype]:
    """The dtype a relaxation rounds its products' operands to (``torch.bfloat16`` under bf16),
    or None for float32 products."""
    return _relax_dtype[0]


def record() -> dict:
    """The switches in force: ``{"cuda_matmul_tf32", "cudnn_tf32", "cuda_bf16_reduced_precision_reduction",
    "relax_products"}``."""
    dtype = _relax_dtype[0]
    return {"cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda_bf16_reduced_precision_reduction": bool(
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
            "relax_products": "float32" if dtype is None else str(dtype).removeprefix("torch.")}
