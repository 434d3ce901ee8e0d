"""Compiling, caching and loading the library of compiled kernels.

The C sources beside this file are compiled together into one shared library on first use, with
the system's C compiler (``$CC``, else ``cc``, ``gcc``, ``clang``), into ``$EPRUN_CACHE`` (default
``~/.cache/eprun``)/native/, and loaded with ctypes. A notice goes to stderr while it compiles.

The library is keyed by a hash of the sources, the flags, the compiler's version and the
machine, so a changed source or another machine builds anew and a cached build is reused.
Flag sets are tried in order — with OpenMP (a batch split on torch's own worker threads), then
without, then without the machine's vector instructions — and the first that builds is used; a
set that failed leaves a ``.failed`` note with the compiler's message, so later processes go
straight to the next (delete the note to try again).

Settings (environment):

* ``EPRUN_NATIVE``: ``auto`` (default: use the library when it builds), ``0`` (never: torch runs
  everything), ``1`` (a failure to build is an error instead of a fallback).
* ``EPRUN_NATIVE_ARCH``: the instruction set compiled for: ``native`` (default: this machine's),
  ``avx2`` (x86-64-v3), ``avx512`` (x86-64-v4). A set this CPU cannot run is refused with the
  reason.

The kernels need AVX2 and FMA: built without them (``generic``, which the benchmarks and tests
compile to measure the scalar loops that also finish every vector loop) they are slower than
torch (docs/performance.md), so a CPU without them (or not x86-64) gets no library and torch
runs everything.

:func:`compile_library` also builds variants with preprocessor defines (``EPRUN_EVERY_STEP``,
``EPRUN_NO_BLOCKS`` in ``dense_relax.c``): the tests and benchmarks that compare the kernels'
paths load such a variant beside the default library; eprun itself always runs the default.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from eprun.cache import cache_dir

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("dense_relax.c", "energy_relax.c", "outer_product.c", "unpool_conv_t.c",
                             "winograd_conv_pool.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("vector_math.h", "block_sums.h"))
VECTOR_FLAGS = ("avx2", "fma")
#: instruction set → the -march flags, and the CPU flags (/proc/cpuinfo) it needs to run
ARCHES = {
    "native": (["-march=native"], VECTOR_FLAGS),
    "avx2": (["-march=x86-64-v3"], VECTOR_FLAGS),
    "avx512": (["-march=x86-64-v4"], VECTOR_FLAGS + ("avx512f", "avx512bw", "avx512dq", "avx512vl")),
    "generic": ([], ()),  # no vector instructions: compiled by benchmarks and tests only
}
#: the ``EPRUN_NATIVE_ARCH`` values
SETTINGS = ("native", "avx2", "avx512")
BASE_FLAGS = ["-O3", "-fPIC", "-shared"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None  # the default library, once loaded
_failure: str | None = None  # why it could not be built, once tried
_settings: tuple[str, str] | None = None  # (EPRUN_NATIVE, EPRUN_NATIVE_ARCH) as read
#: name → (restype, argtypes) of every exported function, declared by the kernel-family modules
PROTOTYPES: dict[str, tuple] = {}


class NativeUnavailable(RuntimeError):
    """``EPRUN_NATIVE=1`` and the library could not be built or loaded."""


def declare(name: str, restype, argtypes: list | None = None) -> None:
    """Declare an exported function's ctypes prototype (set on every library loaded)."""
    PROTOTYPES[name] = (restype, argtypes)


def _read_settings() -> tuple[str, str]:
    global _settings
    if _settings is None:
        value = os.environ.get("EPRUN_NATIVE", "auto").strip().lower()
        mode = {"": "auto", "off": "0", "false": "0", "no": "0", "on": "1", "true": "1", "yes": "1"}.get(value, value)
        arch = os.environ.get("EPRUN_NATIVE_ARCH", "native").strip().lower() or "native"
        _settings = (mode, arch)
    return _settings


def mode() -> str:
    """``EPRUN_NATIVE``: "auto", "0" or "1"; read once, then again after :func:`reset`."""
    return _read_settings()[0]


def arch() -> str:
    """``EPRUN_NATIVE_ARCH``: "native", "avx2", "avx512" or "generic"."""
    return _read_settings()[1]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def flag_sets(arch_name: str) -> list[list[str]]:
    """The flag sets tried in order for ``arch_name``."""
    march = ARCHES[arch_name][0]
    sets = [[*BASE_FLAGS, *march, "-fopenmp"], [*BASE_FLAGS, *march]]
    if march:
        sets.append(list(BASE_FLAGS))
    return sets


def compile_library(arch_name: str = "native", defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library for ``arch_name`` (one of
    :data:`ARCHES`) with ``defines``; raise OSError with the reason on failure."""
    if arch_name not in ARCHES:
        raise OSError(f"EPRUN_NATIVE_ARCH={arch_name!r} is not one of {', '.join(SETTINGS)}")
    missing = [flag for flag in ARCHES[arch_name][1] if flag not in cpu_flags()]
    if missing:
        raise OSError(f"EPRUN_NATIVE_ARCH={arch_name}: this CPU lacks {', '.join(missing)}, which the "
                      f"compiled kernels need (torch runs instead)")
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found ($CC, cc, gcc, clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    extra = [f"-D{name}" for name in defines]
    errors = []
    for flags in flag_sets(arch_name):
        flags = flags + extra
        key = hashlib.sha256(source + " ".join(flags).encode() + version.encode()
                             + platform.machine().encode() + platform.node().encode()).hexdigest()[:16]
        target = cache_dir() / "native" / f"eprun-kernels-{key}.so"
        failed = target.with_suffix(".failed")  # this compiler failed on these flags: not tried again
        if not target.exists() and failed.exists():
            errors.append(f"{' '.join(flags)}: {failed.read_text(errors='replace')} (cached: {failed})")
            continue
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            sys.stderr.write(f"eprun: compiling the native kernels ({' '.join(flags)}) into {target.parent}; "
                             f"this happens once per machine and version\n")
            sys.stderr.flush()
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                run = subprocess.run([cc, *flags, "-o", str(built), *map(str, SOURCES), "-lm"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {run.stderr.strip()[:300]}")
                    note = Path(tmp) / failed.name
                    note.write_text(run.stderr.strip()[:300])
                    os.replace(note, failed)
                    continue
                os.replace(built, target)  # atomic: a concurrent build sees a whole file or none
        library = ctypes.CDLL(str(target))
        for name, (restype, argtypes) in PROTOTYPES.items():
            function = getattr(library, name)
            function.restype = restype
            if argtypes is not None:
                function.argtypes = argtypes
        return library
    raise OSError("the C compiler failed: " + " | ".join(errors))


def library() -> ctypes.CDLL | None:
    """The default library, built on first call; None when disabled or unavailable."""
    global _library, _failure
    if mode() == "0":
        return None
    with _lock:
        if _library is None and _failure is None:
            try:
                if arch() not in SETTINGS:
                    raise OSError(f"EPRUN_NATIVE_ARCH={arch()!r} is not one of {', '.join(SETTINGS)}")
                _library = compile_library(arch())
            except (OSError, subprocess.SubprocessError) as error:
                _failure = str(error)
        if _library is None and mode() == "1":
            raise NativeUnavailable(f"EPRUN_NATIVE=1 but the native kernels could not be built: {_failure}")
        return _library


def failure() -> str | None:
    """Why the library is not available (after :func:`library` was called), or None."""
    return "EPRUN_NATIVE=0" if mode() == "0" else _failure


def reset() -> None:
    """Forget the build result and the settings, so the next call reads ``EPRUN_NATIVE``,
    ``EPRUN_NATIVE_ARCH``, ``CC`` and ``EPRUN_CACHE`` again and builds (or fails) again."""
    global _library, _failure, _settings
    with _lock:
        _library, _failure, _settings = None, None, None
    from eprun.native import parallel

    parallel.reset()
