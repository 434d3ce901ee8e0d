"""Fused relaxations for CUDA devices, written in Triton.

A relaxation step of a small dense net at the papers' batch sizes is a few small kernels; a
fused kernel runs every step of a phase for a block of examples in one launch, the states held
on chip and the weights read from L2. Whether it beats the same steps replayed from a CUDA graph
(:mod:`eprun.cuda_graphs`) is a measurement (``scripts/gpu_check.sh``), so it is used only where
``EPRUN_TRITON=1``; otherwise, and where Triton or a CUDA device is missing, the torch path runs.

``TRITON_INTERPRET=1`` runs the kernels on the CPU (slowly): the tests hold them equal to the
torch path there.
"""

from __future__ import annotations

import os


def enabled() -> bool:
    """``EPRUN_TRITON=1`` asks for the fused kernels."""
    return os.environ.get("EPRUN_TRITON", "0") == "1"


def interpreted() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
