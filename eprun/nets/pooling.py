"""2 × 2 (p × p) max pooling with its argmax indices, for the conv nets of EP and of target propagation.

On the CPU torch's kernel for contiguous (NCHW) maps visits one output at a time, while its
kernel for channels-last maps runs along the channels in vector registers; both scan a window
in the same order and keep the first maximum (and a NaN), so they give the same values and the
same indices (flat positions in each H × W plane) bit for bit. Large CPU maps are therefore
pooled in a channels-last copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS_LAST_POOL_MIN = 1 << 14  # elements of z from which the CPU pooling goes through channels-last


def max_pool_with_indices(z: torch.Tensor, p: int, keep_channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.max_pool2d(z, p, p, return_indices=True)``, the same values and indices bit for bit; a
    large CPU z is pooled in a channels-last copy and the results returned contiguous
    (``keep_channels_last``: as they come, channels-last). Differentiable like ``F.max_pool2d``."""
    if z.device.type == "cpu" and z.dim() == 4 and z.numel() >= CHANNELS_LAST_POOL_MIN:
        pooled, indices = F.max_pool2d(z.contiguous(memory_format=torch.channels_last), p, p, return_indices=True)
        if keep_channels_last:
            return pooled, indices
        return pooled.contiguous(), indices.contiguous()
    return F.max_pool2d(z, p, p, return_indices=True)
