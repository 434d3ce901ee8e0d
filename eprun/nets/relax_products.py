"""The products of one relaxation, in the run's precision (``train.precision``, :mod:`eprun.precision`).

A relaxation's step is a few products of a state with a weight, added to a constant that holds
the input drive or the bias::

    float32, tf32:   z = c + a·(s @ W)                       (torch.addmm; TF32 by torch's switches)
    bf16:            z = c + a·bf16(bf16(s) @ bf16(W))        (torch.mm on bfloat16, then added in float32)

In bf16 the product's sums accumulate in float32 inside the kernel (cuBLAS and cuDNN on the
tensor cores, torch's CPU kernels), its result is rounded to bfloat16 once, and the sum with
c and with the other products is float32, so the state z (and g(z)) keeps float32's precision
beyond the products' own rounding. The weights are rounded once per relaxation (they do not
change during one), the state at every product. The convolutions of a conv net's step go the
same way (:meth:`RelaxProducts.conv2d`, :meth:`RelaxProducts.conv_transpose2d`).

The compiled CPU kernels and the Triton kernel compute in float32; :attr:`RelaxProducts.exact`
is what they check before they run. In bf16 the rounded state and the dense products go into
buffers kept for the relaxation (one per shape), so a step of a dense net allocates nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from eprun import precision


class RelaxProducts:
    """The products of one relaxation: float32 (``dtype`` None) or on ``dtype`` operands.

    Made at the start of a relaxation (the precision is read then); :meth:`weight` prepares a
    weight once for the steps that follow."""

    def __init__(self, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype
        self._buffers: dict[tuple, torch.Tensor] = {}  # (role, shape) → a ``dtype`` buffer reused every step

    @classmethod
    def of_run(cls) -> "RelaxProducts":
        """The products of the precision in force (:func:`eprun.precision.apply`)."""
        return cls(precision.relax_dtype())

    @property
    def exact(self) -> bool:
        """Float32 products: the compiled and Triton kernels, which compute in float32, may run."""
        return self.dtype is None

    def weight(self, w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """W as the steps' products take it: itself, or rounded to ``dtype`` once (a copy)."""
        if w is None or self.dtype is None:
            return w
        return w.detach().to(self.dtype)

    def _buffer(self, role: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        key = (role, tuple(shape))
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(shape, dtype=self.dtype, device=like.device)
        return buffer

    def operand(self, s: torch.Tensor) -> torch.Tensor:
        """A state as a product takes it: itself, or rounded to ``dtype`` (into a buffer that the
        next call with this shape overwrites: consume it before)."""
        if self.dtype is None or s.dtype == self.dtype:
            return s
        return self._buffer("operand", s.shape, s).copy_(s)

    def _product(self, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """bf16(bf16(s) @ w) into its buffer."""
        return torch.mm(self.operand(s), w, out=self._buffer("product", (s.shape[0], w.shape[1]), s))

    def addmm(self, const: torch.Tensor, s: torch.Tensor, w: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
        """out ← const + α·(s @ w), w prepared by :meth:`weight`."""
        if self.dtype is None:
            return torch.addmm(const, s, w, alpha=alpha, out=out)
        return torch.add(const, self._product(s, w), alpha=alpha, out=out)

    def addmm_(self, out: torch.Tensor, s: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """out += α·(s @ w), w prepared by :meth:`weight`."""
        if self.dtype is None:
            return out.addmm_(s, w, alpha=alpha)
        return out.add_(self._product(s, w), alpha=alpha)

    def conv2d(self, s: torch.Tensor, w: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        """W ⋆ s without bias (w prepared by :meth:`weight`); in ``dtype`` where rounded: the
        caller pools it as it comes and brings the pooled map to float32 (:meth:`to_float`)."""
        return F.conv2d(self.operand(s), w, None, stride, padding)

    def conv_transpose2d(self, u: torch.Tensor, w: torch.Tensor, stride: int, padding: int,
                         output_padding: int) -> torch.Tensor:
        """Wᵀ ⋆ u without bias (w prepared by :meth:`weight`), in ``dtype`` where rounded: added
        to a float32 state by the caller."""
        return F.conv_transpose2d(self.operand(u), w, None, stride, padding, output_padding)

    def to_float(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A product's result in ``like``'s dtype (float32), for a caller that adds to it in place."""
        return t if t.dtype == like.dtype else t.to(like.dtype)
