"""The ELU of the target propagation nets, σ(z) = z for z > 0, e^z − 1 for z ≤ 0 (α = 1).

On the CPU torch computes ``F.elu`` through ``expm1``, which its kernels evaluate one element at
a time, while ``exp`` runs in vector registers; the ELU's passes then take a large share of a
small LeNet's target propagation step (docs/performance.md). So on the CPU it is written
through ``exp``::

    σ(z)  = max(e^{min(z, 0)} − 1, z)
    σ'(z) = e^{min(z, 0)} = min(σ(z), 0) + 1

For z > 0 the first term is e⁰ − 1 = 0 < z, so σ(z) = z exactly. For z ≤ 0, e^z − 1 ≥ z, so the
maximum is e^z − 1, computed to within half a unit in the last place of 1 (about 6e-8 in float32)
of expm1's value; where that rounding would put it below z (|z| < ~3e-4, where e^z − 1 = z up to
z²/2) the maximum keeps z, the closer of the two. The derivative is read back from σ(z), as
torch's own ``elu_backward`` does from the result. Elsewhere (CUDA) ``F.elu`` is one fused
kernel and is used as it is; ``tests/test_ff_elu.py`` holds the two equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ExpELU(torch.autograd.Function):
    """σ(z) through exp, its gradient σ'(z) = min(σ(z), 0) + 1 from the saved output."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        out = z.clamp_max(0.0).exp_().sub_(1.0)  # e^{min(z,0)} − 1
        torch.maximum(out, z, out=out)  # σ(z) = max(e^{min(z,0)} − 1, z)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad * out.clamp_max(0.0).add_(1.0)  # σ'(z) = min(σ(z), 0) + 1


def elu(z: torch.Tensor) -> torch.Tensor:
    """σ(z) = ELU(z), α = 1: through exp on the CPU, ``F.elu`` elsewhere."""
    if z.device.type == "cpu":
        return _ExpELU.apply(z)
    return F.elu(z)
