"""Compiled kernels for the CPU, loaded through ctypes: faster engines behind the nets' methods.

Each kernel computes what the net's torch code computes (the definition), is tested equal to it,
and is used only where it applies (CPU, float32, the shapes it handles); everywhere else, and with
``EPRUN_NATIVE=0``, torch runs. Modules, one job each: :mod:`~eprun.native.build` (compiling,
caching, loading, settings), :mod:`~eprun.native.parallel` (the batch split over torch's OpenMP
threads), :mod:`~eprun.native.dense` (the dense nets' relaxation, EP phases and update),
:mod:`~eprun.native.energy` (the energy-based dense net's relaxation) and
:mod:`~eprun.native.conv` (the conv nets' pooled top-down term and Winograd convolution).
"""

from eprun.native import conv, dense, energy  # noqa: F401  (declare their prototypes before any library loads)
from eprun.native.build import NativeUnavailable, library, mode, reset
from eprun.native.parallel import shares_openmp


def status() -> dict:
    """What the native kernels do here: the settings, whether the library loaded, what it was
    built with (AVX2, with the block path; AVX-512 also for the one-pass path), whether it splits batches on
    torch's OpenMP threads, or why it is unavailable."""
    from eprun.native import build

    lib = library() if mode() != "0" else None
    return {"mode": mode(), "arch": build.arch(), "available": lib is not None,
            "vectorized": bool(lib.eprun_native_vectorized()) if lib is not None else False,
            "avx512": bool(lib.eprun_native_avx512()) if lib is not None else False,
            "openmp": shares_openmp(lib) if lib is not None else False,
            "reason": None if lib is not None else build.failure()}


__all__ = ["NativeUnavailable", "conv", "dense", "energy", "library", "mode", "reset", "status"]
