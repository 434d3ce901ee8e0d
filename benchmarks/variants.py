"""Variant builds of the native kernels for the scripts that compare the kernels' paths:
``with variant("EPRUN_NO_BLOCKS"):`` runs eprun on a build with those preprocessor defines in
place of the default library (see :mod:`eprun.native.build`)."""

from __future__ import annotations

import contextlib

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
