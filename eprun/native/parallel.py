"""How many threads a compiled kernel splits a batch over.

Built with OpenMP, the library's parallel regions run on torch's own OpenMP worker threads, which
are still spinning from torch's last product: the split then pays from a few rows a thread. That
holds only when the process has loaded a single OpenMP runtime, torch's; with two (a torch built
with another OpenMP, say) there would be two pools of threads spinning on the same cores, and a
library without OpenMP has no parallel region: the kernels then run on the calling thread.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: rows per thread from which a batch is split on the OpenMP workers
OPENMP_SPLIT_ROWS = 8

_shares_openmp: bool | None = None


def one_openmp_runtime() -> bool:
    """True when the process has loaded a single OpenMP runtime, torch's. Read from
    /proc/self/maps (Linux); elsewhere, False."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if any(name in line.rsplit("/", 1)[-1] for name in ("libgomp", "libiomp", "libomp"))}
    return len(runtimes) == 1


def shares_openmp(library) -> bool:
    """The library was built with OpenMP and runs on torch's OpenMP runtime (decided once)."""
    global _shares_openmp
    if _shares_openmp is None:
        _shares_openmp = bool(library.eprun_native_openmp()) and one_openmp_runtime()
    return _shares_openmp


def threads_for(library, rows: int) -> int:
    """Threads for a batch of ``rows``: up to torch's thread count with at least
    :data:`OPENMP_SPLIT_ROWS` rows each on the OpenMP workers; 1 without them."""
    if not shares_openmp(library):
        return 1
    return max(1, min(torch.get_num_threads(), rows // OPENMP_SPLIT_ROWS))


def all_threads(library) -> int:
    """Threads for a kernel that splits its own work (not by rows): torch's count, or 1."""
    return torch.get_num_threads() if shares_openmp(library) else 1


def reset() -> None:
    global _shares_openmp
    _shares_openmp = None
