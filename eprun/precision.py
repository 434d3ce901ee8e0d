"""The arithmetic precision of a run on CUDA (``train.precision``), set explicitly, never by a
library default.

* ``float32``: every product and convolution in IEEE float32 (TF32 off for cuBLAS and cuDNN).
  What the CPU computes, up to summation order.
* ``tf32``: float32 storage, products and convolutions on the tensor cores' TF32 (a 10-bit
  mantissa for the multiplicands, float32 accumulation). cuDNN's own default, which applied to
  every convolution without a word until the policy was explicit.

States, updates and optimiser state are float32 either way. On the CPU TF32 does not exist and
the setting changes nothing. The flags are process-wide (torch's); :func:`apply` sets both and
:func:`record` reads them back for ``env.json``.
"""

from __future__ import annotations

from typing import Literal

import torch

Precision = Literal["float32", "tf32"]
PRECISIONS = ("float32", "tf32")


def apply(precision: str, device: torch.device) -> None:
    """Set torch's TF32 switches for ``precision`` (on a CUDA device; nothing on others)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        return
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def record() -> dict:
    """The switches in force: ``{"cuda_matmul_tf32": bool, "cudnn_tf32": bool}``."""
    return {"cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}
