"""Per-batch data augmentation on the device: random crop with padding, horizontal flip.

The runner applies :func:`augment` to each training batch x (B, C, H, W), already float and
normalised, on whatever device x lives on. For each example b independently:

* **random crop** (``random_crop_padding`` = p > 0): pad x by p pixels on every side
  (``padding_mode``: "zeros" = the value 0, which after normalisation is the training mean
  for "standard"/"cifar10", "reflect" or "replicate"), then take the H×W window at offset
  (δy_b, δx_b), each uniform in {0, …, 2p}:

      x'_b[c, i, j] = pad(x)_b[c, i + δy_b, j + δx_b]

  so the content moves by δ − p ∈ [−p, p] pixels in each direction;
* **horizontal flip** (``horizontal_flip``): with probability ½, f_b ~ Bernoulli(½),
  x'_b[c, i, j] ← x'_b[c, i, W − 1 − j].

Both are one gather with an index built from the per-example offsets (no loop over
examples). All random draws come from the ``generator`` argument, in a fixed order (δy, δx,
then f), so the same generator state gives the same batch on any device; they are drawn on
the generator's device (normally the CPU) and only the (B,)-sized results are moved to x's
device. Validation and test batches are never augmented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from eprun.errors import DataError
from eprun.limits import MAX_KERNEL, within
from eprun.schema import Section

PADDING_MODES = ("zeros", "reflect", "replicate")

#: ``padding_mode`` → the ``mode`` of :func:`torch.nn.functional.pad`.
_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


@dataclass
class AugmentConfig(Section):
    """Training-batch augmentation; everything off by default (then :func:`augment` is identity)."""

    random_crop_padding: int = 0      # p: pad by p, crop back at a random offset; 0 = off
    padding_mode: Literal["zeros", "reflect", "replicate"] = "zeros"
    horizontal_flip: bool = False     # flip each example left–right with probability ½

    def check(self):
        p = self.random_crop_padding
        if not isinstance(p, int) or isinstance(p, bool):
            yield "random_crop_padding", f"must be an integer ≥ 0 (0 = off), got {p!r}"
        else:
            yield from within("random_crop_padding", p, 0, MAX_KERNEL)
        if self.padding_mode not in PADDING_MODES:
            yield "padding_mode", f"unknown mode {self.padding_mode!r} (allowed: {', '.join(PADDING_MODES)})"
        if not isinstance(self.horizontal_flip, bool):
            yield "horizontal_flip", f"must be true or false, got {self.horizontal_flip!r}"

    @property
    def enabled(self) -> bool:
        """True when :func:`augment` changes anything."""
        return self.random_crop_padding > 0 or self.horizontal_flip


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Randomly crop (with padding) and/or flip each example of x (B, C, H, W); see module doc.

    Returns ``x`` itself when ``cfg`` turns everything off, else a new tensor of x's shape,
    dtype and device; x is never modified.
    """
    if not cfg.enabled:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment: expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    p = cfg.random_crop_padding
    if cfg.padding_mode == "reflect" and p >= min(height, width):
        raise DataError(
            f"data.augment.random_crop_padding = {p}: reflect padding needs p < the image size "
            f"{height}×{width}; use a smaller padding or padding_mode 'zeros' / 'replicate'"
        )

    # Random draws, in a fixed order, on the generator's device; then (B,) tensors to x's device.
    draw = {"generator": generator, "device": generator.device}
    dy = torch.randint(0, 2 * p + 1, (batch,), **draw).to(x.device, non_blocking=True)
    dx = torch.randint(0, 2 * p + 1, (batch,), **draw).to(x.device, non_blocking=True)
    flip = (torch.rand((batch,), **draw) < 0.5) if cfg.horizontal_flip else None

    padded = F.pad(x, (p, p, p, p), mode=_PAD_MODE[cfg.padding_mode]) if p > 0 else x
    padded_width = width + 2 * p
    rows = dy[:, None] + torch.arange(height, device=x.device)          # (B, H): i + δy_b
    cols = dx[:, None] + torch.arange(width, device=x.device)           # (B, W): j + δx_b
    if flip is not None:
        cols = torch.where(flip.to(x.device, non_blocking=True)[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    out = padded.reshape(batch, channels, -1).gather(2, index.expand(batch, channels, height * width))
    return out.view(batch, channels, height, width)
