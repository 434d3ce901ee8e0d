"""Variant builds of the native kernels for the scripts that compare the kernels' paths:
``with variant("EPRUN_NO_BLOCKS"):`` runs eprun on a build with those preprocessor defines in
place of the default library (see :mod:`eprun.native.build`)."""

from __future__ import annotations

import contextlib
import os

import torch

from eprun.native import build, parallel


@contextlib.contextmanager
def variant(*defines: str, arch: str = "native"):
    library = build.compile_library(arch, tuple(defines))
    saved = build._library, build._failure
    build._library, build._failure = library, None
    parallel.reset()
    try:
        yield library
    finally:
        build._library, build._failure = saved
        parallel.reset()


@contextlib.contextmanager
def engine(mode: str):
    """``EPRUN_NATIVE`` = ``mode`` ("0": torch; "auto": the compiled kernels) inside the block,
    read afresh; as it was after it."""
    from eprun import native

    saved = os.environ.get("EPRUN_NATIVE")
    os.environ["EPRUN_NATIVE"] = mode
    native.reset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EPRUN_NATIVE", None)
        else:
            os.environ["EPRUN_NATIVE"] = saved
        native.reset()


@contextlib.contextmanager
def threads_kept():
    """Torch's thread count back as the block found it."""
    saved = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(saved)
