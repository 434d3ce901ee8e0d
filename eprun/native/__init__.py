"""A compiled relaxation for dense EP nets on the CPU (``dense_relax.c``), loaded through ctypes.

Why: a relaxation step of the 784-512-10 net is two skinny products (50×10·10×512 and
50×512·512×10) and σ of 25,600 states; through torch each is a separate pass over memory with
its own dispatch, and σ alone costs ~1 ns an element. Every example relaxes independently, so
the kernel runs two examples at a time through all their steps with their states and the
couplings in the first-level cache (each weight loaded serves both), and fuses the products, the
constant, the nudge and σ into one pass per layer. Where the compiler targets AVX-512, a net of
one hidden layer under at most 16 outputs goes one example at a time through one pass over the
hidden units a step, both products and σ in 16-wide vectors (784-512-10, batch 50, one thread:
562 → 313 ns an example-step against the two-example path, ``python -m benchmarks.native_step``).
Deeper or wider nets (AVX-512 builds) relax up to 12 examples together, each 16-wide load of a
weight serving all of them, from couplings packed once a call into one contiguous stream per 32
units (784-512-512-512-10, batch 20, 2 threads: 0.43–0.51 → 0.11–0.13 ms a step against pairs;
:func:`use_block_path` switches between the two for comparison).

For EP's training step on such a net, :func:`ep_dense_phases` runs the free phase and the
nudged phase in one call (each row range of the batch through both phases on one thread, the
same steps as two relaxations) and :func:`ep_dense_update` accumulates the update of every layer
in another: between them they replace about twenty torch calls and two kernel calls a batch,
whose Python and dispatch cost more than the relaxation of a 784-512-10 net at batch 50 takes
(``python -m benchmarks.mlp_breakdown``, "fixed costs").

The conv nets' top-down term of a max-pooled layer, Wᵀ ⋆ Pᵀ(s), is computed here too
(``unpool_conv_t.c``, :func:`unpool_conv_t`): from the one nonzero in each pooling window,
a quarter of the dense transposed convolution's multiply-adds with 2×2 pools. So are a 5×5
convolution and the 2×2 max pooling after it (``winograd_conv_pool.c``,
:func:`winograd_conv_pool`): Winograd's F(4×4, 5×5), about a fifth of the direct multiply-adds.

A batch is split into row ranges run on up to ``torch.get_num_threads()`` threads; the split
changes no result. Built with OpenMP (the first flag set), the library shares torch's OpenMP
runtime, and the split runs in one parallel region on the same worker threads as torch's
products, which are still spinning from the last one: from :data:`OPENMP_SPLIT_ROWS` rows a
thread (batch 50, 2 threads: free phase 1.0 → 0.6 ms). Otherwise the ranges go to Python threads
(ctypes releases the GIL during the call), from :data:`SPLIT_ROWS` rows a thread: below that,
torch's workers, spinning after a product, took the second core from them (no gain at batch 50).

The sources (``dense_relax.c``, ``outer_product.c`` for :func:`add_outer_` and
:func:`ep_dense_update`, ``unpool_conv_t.c`` for :func:`unpool_conv_t` and
``winograd_conv_pool.c`` for :func:`winograd_conv_pool`) are compiled into one library on
first use with the system C compiler (``$CC``, else ``cc``) into ``$EPRUN_CACHE`` (default
``~/.cache/eprun``)/native/, keyed by a hash of the source, the flags, the compiler's version
and the machine; a flag set that failed leaves a ``.failed`` note there with the compiler's
message, so later processes go straight to the next set (delete the note to try again).
Without a compiler, or with ``EPRUN_NATIVE=0``,
the torch path runs instead (same dynamics; float32 results differ by rounding only).
``EPRUN_NATIVE=1`` makes a failure to build an error instead of a fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("dense_relax.c", "outer_product.c", "unpool_conv_t.c", "winograd_conv_pool.c"))
# the first set that builds is used: OpenMP (to split a batch on torch's own worker threads), then
# without it, then without the host's vector instructions
FLAG_SETS = (["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"], ["-O3", "-march=native", "-fPIC", "-shared"],
             ["-O3", "-fPIC", "-shared"])
ACTIVATION_CODES = {"sigmoid": 0, "hard_sigmoid": 1, "hard_sigmoid_half": 1, "tanh": 2}
MAX_LAYERS = 64

_lock = threading.Lock()
_library = None  # the loaded library, once built
_failure: str | None = None  # why it could not be built, once tried
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_mode: str | None = None  # EPRUN_NATIVE, as read
_shares_openmp = False  # the library was built with OpenMP and uses the process's one OpenMP runtime
SPLIT_ROWS = 256  # rows per thread before a batch is split on Python threads (no OpenMP split)
OPENMP_SPLIT_ROWS = 8  # rows per thread before a batch is split on the OpenMP workers
# with a fixed number of steps, stop an example once a step leaves its state unchanged bit for bit
# (lossless: every further step would return the same state; see dense_relax.c)
STOP_AT_FIXED_POINT = True
MIN_STEPS = 2  # a single step costs more through the call than on torch (202 vs 170 µs, batch 20, 784-512-10)


class NativeUnavailable(RuntimeError):
    """``EPRUN_NATIVE=1`` and the kernel could not be built or loaded."""


def mode() -> str:
    """``EPRUN_NATIVE``: "auto" (default: use it when it builds), "0" (never), "1" (always, or fail).
    Read once, then again after :func:`reset`."""
    global _mode
    if _mode is None:
        value = os.environ.get("EPRUN_NATIVE", "auto").strip().lower()
        _mode = {"": "auto", "off": "0", "false": "0", "no": "0", "on": "1", "true": "1", "yes": "1"}.get(value, value)
    return _mode


def _cache_dir() -> Path:
    root = os.environ.get("EPRUN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "eprun"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _build() -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library; raise with the reason on failure."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found ($CC, cc, gcc, clang)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    source = b"".join(path.read_bytes() for path in SOURCES)
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join(flags).encode() + version.encode()
                             + platform.machine().encode() + platform.node().encode()).hexdigest()[:16]
        target = _cache_dir() / "native" / f"dense_relax-{key}.so"
        failed = target.with_suffix(".failed")  # this compiler failed on these flags: not tried again
        if not target.exists() and failed.exists():
            errors.append(f"{' '.join(flags)}: {failed.read_text(errors='replace')} (cached: {failed})")
            continue
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                run = subprocess.run([compiler, *flags, "-o", str(built), *map(str, SOURCES), "-lm"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {run.stderr.strip()[:300]}")
                    note = Path(tmp) / failed.name
                    note.write_text(run.stderr.strip()[:300])
                    os.replace(note, failed)
                    continue
                os.replace(built, target)  # atomic: a concurrent build sees a whole file or none
        library = ctypes.CDLL(str(target))
        library.eprun_relax_dense.restype = ctypes.c_int
        library.eprun_relax_dense.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int,
            ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        library.eprun_relax_dense_split.restype = ctypes.c_int
        library.eprun_relax_dense_split.argtypes = library.eprun_relax_dense.argtypes + [ctypes.c_int]
        pointers = ctypes.POINTER(ctypes.c_void_p)
        library.eprun_ep_dense_phases.restype = ctypes.c_int
        library.eprun_ep_dense_phases.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_int64), pointers, pointers, pointers, ctypes.POINTER(ctypes.c_int),
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, pointers, pointers, ctypes.c_float, ctypes.c_int,
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        library.eprun_ep_dense_update.restype = ctypes.c_int
        library.eprun_ep_dense_update.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, pointers, pointers, pointers, pointers,
            ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int]
        library.eprun_relax_blocked.restype = ctypes.c_int
        library.eprun_relax_blocked.argtypes = [ctypes.c_int]
        library.eprun_native_vectorized.restype = ctypes.c_int
        library.eprun_native_openmp.restype = ctypes.c_int
        library.eprun_native_avx512.restype = ctypes.c_int
        library.eprun_add_outer.restype = ctypes.c_int
        library.eprun_add_outer.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_int]
        library.eprun_add_outer_available.restype = ctypes.c_int
        library.eprun_unpool_conv_t.restype = ctypes.c_int
        library.eprun_unpool_conv_t.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_int] + [
            ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.POINTER(ctypes.c_int64)] * 3 + [ctypes.c_int]
        library.eprun_unpool_conv_t_available.restype = ctypes.c_int
        library.eprun_unpool_conv_t_available.argtypes = [ctypes.c_int64] * 6
        library.eprun_winograd_conv_pool.restype = ctypes.c_int
        library.eprun_winograd_conv_pool.argtypes = [ctypes.c_void_p] * 4 + [
            ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
        library.eprun_winograd_conv_pool_available.restype = ctypes.c_int
        library.eprun_winograd_conv_pool_available.argtypes = [ctypes.c_int64] * 7
        return library
    raise OSError("the C compiler failed: " + " | ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None when disabled or unavailable."""
    global _library, _failure, _shares_openmp
    if mode() == "0":
        return None
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _build()
                _shares_openmp = bool(_library.eprun_native_openmp()) and _one_openmp_runtime()
            except (OSError, subprocess.SubprocessError) as error:
                _failure = str(error)
        if _library is None and mode() == "1":
            raise NativeUnavailable(f"EPRUN_NATIVE=1 but the native relaxation could not be built: {_failure}")
        return _library


def _one_openmp_runtime() -> bool:
    """True when the process has loaded a single OpenMP runtime, torch's: then the library's
    parallel regions run on torch's worker threads. Two runtimes (a torch built with another
    OpenMP, say) would mean two pools of threads spinning on the same cores; the split is then
    done on Python threads instead. Read from /proc/self/maps (Linux); elsewhere, False."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if any(name in line.rsplit("/", 1)[-1] for name in ("libgomp", "libiomp", "libomp"))}
    return len(runtimes) == 1


def reset() -> None:
    """Forget the build result, so the next call builds (or fails) again: after changing
    ``EPRUN_NATIVE``, ``CC`` or ``EPRUN_CACHE`` in a running process."""
    global _library, _failure, _mode, _shares_openmp
    with _lock:
        _library, _failure, _mode, _shares_openmp = None, None, None, False


def status() -> dict:
    """What the native path is doing here: mode, whether it loaded, vectorised (AVX2; AVX-512 for
    the one-pass two-layer path), whether it splits on OpenMP, or why not."""
    lib = library() if mode() != "0" else None
    return {"mode": mode(), "available": lib is not None,
            "vectorized": bool(lib.eprun_native_vectorized()) if lib is not None else False,
            "avx512": bool(lib.eprun_native_avx512()) if lib is not None else False,
            "openmp": _shares_openmp if lib is not None else False,
            "reason": None if lib is not None else ("EPRUN_NATIVE=0" if mode() == "0" else _failure)}


def supports(state: list[torch.Tensor], *tensors: torch.Tensor, steps: int = MIN_STEPS) -> bool:
    """True when the kernel can run this relaxation: CPU, float32, contiguous, few enough layers,
    at least :data:`MIN_STEPS` steps."""
    if steps < MIN_STEPS or mode() == "0" or len(state) > MAX_LAYERS:
        return False
    for t in (*state, *tensors):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    return library() is not None


def _threads(rows: int) -> int:
    """Threads for a batch of ``rows``: up to torch's thread count, with at least
    :data:`OPENMP_SPLIT_ROWS` rows each on the OpenMP workers, :data:`SPLIT_ROWS` on Python threads."""
    return max(1, min(torch.get_num_threads(), rows // (OPENMP_SPLIT_ROWS if _shares_openmp else SPLIT_ROWS)))


def use_block_path(on: bool | None = None) -> bool:
    """Whether nets past one hidden layer under a small output relax in blocks of examples
    (``dense_relax.c``, AVX-512 builds; otherwise in pairs): set it with ``on`` (for benchmarks
    and tests that compare both), and get the previous setting. False without the library."""
    lib = library()
    if lib is None:
        return False
    return bool(lib.eprun_relax_blocked(-1 if on is None else int(on)))


def relax_dense(state: list[torch.Tensor], constant: list[torch.Tensor], up: list[torch.Tensor | None],
                down: list[torch.Tensor | None], scale: float, activation: str, nudge: float, steps: int,
                order: str, tol: float = 0.0, check_every: int = 1, count_steps: bool = False) -> torch.Tensor | None:
    """Run ``steps`` steps in place on ``state`` (see ``dense_relax.c`` for the step)::

        s_i ← g(c_i + a·(U_i s_{i−1}) + a·(D_iᵀ s_{i+1}) [+ ν·s_i at the output layer])

    ``constant[i]`` is [batch, n_i] or [n_i]; ``up[i]`` = U_i, [n_i, n_{i−1}] (``up[0]`` is
    None); ``down[i]`` = D_i, [n_{i+1}, n_i] (``down[-1]`` is None); ``nudge`` ν = −a·β (0 when
    free). The caller checked :func:`supports` for every tensor.

    ``tol`` > 0: each example stops after the first step t (a multiple of ``check_every``) in
    which none of its states moved by ``tol`` or more; the steps each example took are returned
    ([batch] int32). With ``tol`` = 0 the result is that of ``steps`` steps, and None is returned
    (or, with ``count_steps``, the steps computed: with :data:`STOP_AT_FIXED_POINT` an example
    stops computing once a step leaves its state bit for bit as it was).
    """
    global _pool, _pool_size
    lib = library()
    n = len(state)
    batch = state[0].shape[0]
    sizes = (ctypes.c_int64 * n)(*[s.shape[1] for s in state])
    states = (ctypes.c_void_p * n)(*[s.data_ptr() for s in state])
    constants = (ctypes.c_void_p * n)(*[c.data_ptr() for c in constant])
    per_row = (ctypes.c_int * n)(*[int(c.dim() == 2) for c in constant])
    ups = (ctypes.c_void_p * n)(*[m.data_ptr() if m is not None else None for m in up])
    downs = (ctypes.c_void_p * n)(*[m.data_ptr() if m is not None else None for m in down])
    taken = torch.empty(batch, dtype=torch.int32) if tol > 0.0 or count_steps else None
    args = (n, sizes, states, constants, per_row, ups, downs, float(scale), ACTIVATION_CODES[activation],
            float(nudge), int(steps), int(order == "async"), float(tol), int(check_every), int(STOP_AT_FIXED_POINT),
            taken.data_ptr() if taken is not None else None)
    threads = _threads(batch)
    if threads == 1:
        codes = [lib.eprun_relax_dense(*args, 0, batch)]
    elif _shares_openmp:
        codes = [lib.eprun_relax_dense_split(*args, 0, batch, threads)]
    else:
        with _lock:
            if _pool is None or _pool_size < threads:
                _pool, _pool_size = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="eprun-relax"), threads
            pool = _pool
        bounds = [batch * k // threads for k in range(threads + 1)]
        futures = [pool.submit(lib.eprun_relax_dense, *args, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        codes = [f.result() for f in futures]
    if any(code != 0 for code in codes):
        raise MemoryError("the native relaxation could not allocate its scratch state")
    return taken


def phases_in_one_call(batch: int) -> bool:
    """True when :func:`ep_dense_phases` splits a batch as :func:`relax_dense` would: on the OpenMP
    workers, or on one thread when the batch is too small to split on Python threads."""
    return _shares_openmp or _threads(batch) == 1


def ep_dense_phases(free: list[torch.Tensor], nudged: list[torch.Tensor], constant: list[torch.Tensor],
                    up: list[torch.Tensor | None], down: list[torch.Tensor | None], labels: torch.Tensor,
                    scale: float, activation: str, beta: float, free_steps: int, nudged_steps: int, order: str,
                    tol: float = 0.0, check_every: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both phases of one-sided EP with the MSE read-out in one call (``dense_relax.c``,
    ``eprun_ep_dense_phases``): ``free`` ← s* (``free_steps`` steps from s = 0 with the constants
    c_i), ``nudged`` ← s^β (``nudged_steps`` steps from s* with a·β·y added to the output
    constant and ν = −a·β), y the one-hot code of ``labels`` (int64, [batch]). ``free`` and
    ``nudged`` are [batch, n_i] float32 buffers, written whole; the other arguments are those of
    :func:`relax_dense`. The caller checked :func:`supports` for every tensor.

    Returns (steps each example took in the free phase, in the nudged phase, [batch] int32;
    the MSE loss ½‖y − s*_out‖² per example, float32)."""
    lib = library()
    n = len(free)
    batch = free[0].shape[0]
    n_out = free[-1].shape[1]
    nudged_constant = torch.empty(batch, n_out)
    taken = torch.empty(2, batch, dtype=torch.int32)
    loss = torch.empty(batch)
    array = ctypes.c_void_p * n
    code = lib.eprun_ep_dense_phases(
        n, (ctypes.c_int64 * n)(*[s.shape[1] for s in free]), array(*[s.data_ptr() for s in free]),
        array(*[s.data_ptr() for s in nudged]), array(*[c.data_ptr() for c in constant]),
        (ctypes.c_int * n)(*[int(c.dim() == 2) for c in constant]), nudged_constant.data_ptr(), labels.data_ptr(),
        float(scale * beta), array(*[m.data_ptr() if m is not None else None for m in up]),
        array(*[m.data_ptr() if m is not None else None for m in down]), float(scale), ACTIVATION_CODES[activation],
        int(free_steps), int(nudged_steps), int(order == "async"), float(tol), int(check_every),
        int(STOP_AT_FIXED_POINT), taken[0].data_ptr(), taken[1].data_ptr(), loss.data_ptr(), batch,
        _threads(batch) if _shares_openmp else 1)
    if code != 0:
        raise MemoryError("the native relaxation could not allocate its scratch state")
    return taken[0], taken[1], loss


def ep_dense_update(x: torch.Tensor, free: list[torch.Tensor], nudged: list[torch.Tensor],
                    weight_grads: list[torch.Tensor], bias_grads: list[torch.Tensor], c: float) -> bool:
    """EP's one-sided update of a dense chain accumulated into the gradients (``outer_product.c``,
    ``eprun_ep_dense_update``), with s⁰ = x [batch, n_0] and the states s¹ … s^L::

        G_0 += c·(s¹* − s¹β)ᵀ x,   G_n += c·(s^{n+1}*ᵀ s^n* − s^{n+1}βᵀ s^nβ),   g_{n+1} += c·Σ_b (s^{n+1}* − s^{n+1}β)

    ``free`` = s*, ``nudged`` = s^β. Returns False, having done nothing, when the tensors (CPU,
    float32, contiguous, matching shapes) or the build (AVX-512) do not allow it."""
    if not add_outer_available():
        return False
    n = len(free)
    batch = x.shape[0]
    sizes = [x.shape[1]] + [s.shape[1] for s in free]
    for i in range(n):
        if (weight_grads[i].shape != (sizes[i + 1], sizes[i]) or bias_grads[i].shape != (sizes[i + 1],)
                or free[i].shape != (batch, sizes[i + 1]) or nudged[i].shape != free[i].shape):
            return False
    for t in (x, *free, *nudged, *weight_grads, *bias_grads):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            return False
    diff = torch.empty(batch, sizes[1])
    array = ctypes.c_void_p * n
    code = library().eprun_ep_dense_update(
        n, (ctypes.c_int64 * (n + 1))(*sizes), x.data_ptr(), array(*[s.data_ptr() for s in free]),
        array(*[s.data_ptr() for s in nudged]), array(*[g.data_ptr() for g in weight_grads]),
        array(*[g.data_ptr() for g in bias_grads]), diff.data_ptr(), float(c), batch,
        torch.get_num_threads() if _shares_openmp else 1)
    return code == 0


def add_outer_available() -> bool:
    """True when :func:`add_outer_` runs compiled here (a build with AVX-512)."""
    lib = library()
    return lib is not None and bool(lib.eprun_add_outer_available())


def add_outer_(out: torch.Tensor, a: torch.Tensor, x: torch.Tensor, alpha: float) -> bool:
    """out += α · aᵀ x  (``outer_product.c``) for out [n, m], a [batch, n], x [batch, m]: CPU,
    float32, contiguous, checked here. Returns False, having done nothing, when the tensors or
    the build do not allow it."""
    if not add_outer_available():
        return False
    batch, n = a.shape
    if (out.shape != (n, x.shape[1]) or x.shape[0] != batch
            or any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in (out, a, x))):
        return False
    code = library().eprun_add_outer(out.data_ptr(), a.data_ptr(), x.data_ptr(), batch, n, x.shape[1], float(alpha),
                                     torch.get_num_threads() if _shares_openmp else 1)
    return code == 0


def unpool_conv_t_available(kernel: int, stride: int, padding: int, z_width: int, width: int, channels: int) -> bool:
    """True when :func:`unpool_conv_t` runs compiled for this geometry (an AVX-512 build, stride 1,
    one of the kernel / padding / widths that ``unpool_conv_t.c`` instantiates, ``channels`` the
    output channels)."""
    lib = library()
    return lib is not None and bool(lib.eprun_unpool_conv_t_available(kernel, stride, padding, z_width, width,
                                                                       channels))


def unpool_conv_t(above: torch.Tensor, indices: torch.Tensor, weight_r: torch.Tensor, z_size: tuple[int, int],
                  size: tuple[int, int], padding: int, out: torch.Tensor, base: torch.Tensor | None = None,
                  alpha: float = 1.0, clamp01: bool = False) -> bool:
    """out = base + α·(Wᵀ ⋆ Pᵀ(above)), then clamped to [0, 1] if ``clamp01`` (``unpool_conv_t.c``):
    the transposed convolution (stride 1) of the max-pool adjoint,
    ``conv_transpose2d(max_unpool2d(above, indices, …, z_size), W, padding)``, with the rest of a
    layer's update fused in.

    ``above`` [batch, co, hp, wp] float32 and ``indices`` (int64, the argmax of each window,
    row-major in the z_size plane) with any strides; ``weight_r`` = W.permute(2, 0, 3, 1),
    contiguous [k, co, k, ci]; ``out`` and ``base`` (or None: 0) contiguous [batch, h, w, ci]
    float32 (``size`` = (h, w); a channels-last [batch, ci, h, w] tensor permuted), ``out``
    written whole; ``base`` must not overlap ``out`` (which holds partial sums on the way). CPU tensors, checked here. Returns False, having done nothing, when the
    tensors, the geometry or the build do not allow it."""
    lib = library()
    if lib is None:
        return False
    batch, co, hp, wp = above.shape
    k, c_out, _, ci = weight_r.shape
    tensors = (above, weight_r, out) if base is None else (above, weight_r, out, base)
    if (indices.shape != above.shape or c_out != co or out.shape != (batch, *size, ci) or not out.is_contiguous()
            or not weight_r.is_contiguous() or indices.dtype != torch.int64
            or (base is not None and (base.shape != out.shape or not base.is_contiguous()))
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
            or not lib.eprun_unpool_conv_t_available(k, 1, padding, z_size[1], size[1], ci)):
        return False
    shape = (ctypes.c_int64 * 10)(co, hp, wp, z_size[0], z_size[1], ci, size[0], size[1], k, padding)
    code = lib.eprun_unpool_conv_t(out.data_ptr(), None if base is None else base.data_ptr(), float(alpha),
                                   int(clamp01), above.data_ptr(), indices.data_ptr(), weight_r.data_ptr(), batch,
                                   shape, (ctypes.c_int64 * 4)(*above.stride()),
                                   (ctypes.c_int64 * 4)(*indices.stride()),
                                   torch.get_num_threads() if _shares_openmp else 1)
    if code == -2:
        raise MemoryError("the native transposed convolution could not allocate its scratch")
    return code == 0


def winograd_conv_pool_available(kernel: int, stride: int, pool: int, z_size: tuple[int, int], in_channels: int,
                                 out_channels: int) -> bool:
    """True when :func:`winograd_conv_pool` runs compiled for this geometry (an AVX-512 build,
    5 × 5 kernel, stride 1, 2 × 2 max pooling, z's sides multiples of 4, ``in_channels`` a
    multiple of 16, ``out_channels`` of 64; ``winograd_conv_pool.c``)."""
    lib = library()
    return lib is not None and bool(lib.eprun_winograd_conv_pool_available(kernel, stride, pool, *z_size,
                                                                           in_channels, out_channels))


def winograd_conv_pool(s: torch.Tensor, weight_u: torch.Tensor, padding: int, pooled: torch.Tensor,
                       indices: torch.Tensor) -> bool:
    """pooled, indices ← ``F.max_pool2d(F.conv2d(s, W, padding=padding), 2, 2, return_indices=True)``
    by Winograd's F(4 × 4, 5 × 5) with the pooling fused in (``winograd_conv_pool.c``); values
    equal to rounding, indices those of the max of the values computed.

    ``s`` [batch, ci, h, w] float32 channels-last (``s.permute(0, 2, 3, 1)`` contiguous);
    ``weight_u`` = :func:`eprun.nets.winograd.transform_weights` of W, [64, ci, co];
    ``pooled`` (float32) and ``indices`` (int64) [batch, co, hz/2, wz/2] channels-last, written
    whole. CPU tensors, checked here. Returns False, having done nothing, when the tensors, the
    geometry or the build do not allow it."""
    lib = library()
    if lib is None:
        return False
    batch, ci, h, w = s.shape
    co = weight_u.shape[2]
    hz, wz = h + 2 * padding - 4, w + 2 * padding - 4
    rows = (s.permute(0, 2, 3, 1), pooled.permute(0, 2, 3, 1), indices.permute(0, 2, 3, 1))
    if (weight_u.shape != (64, ci, co) or not weight_u.is_contiguous() or not all(r.is_contiguous() for r in rows)
            or pooled.shape != (batch, co, hz // 2, wz // 2) or indices.shape != pooled.shape
            or indices.dtype != torch.int64
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (s, weight_u, pooled))
            or not lib.eprun_winograd_conv_pool_available(5, 1, 2, hz, wz, ci, co)):
        return False
    shape = (ctypes.c_int64 * 5)(h, w, ci, co, padding)
    code = lib.eprun_winograd_conv_pool(pooled.data_ptr(), indices.data_ptr(), s.data_ptr(), weight_u.data_ptr(),
                                        batch, shape, torch.get_num_threads() if _shares_openmp else 1)
    if code == -2:
        raise MemoryError("the native Winograd convolution could not allocate its scratch")
    return code == 0

