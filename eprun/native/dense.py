"""The dense nets' kernels: the relaxation of a chain of dense layers (``dense_relax.c``), EP's two
phases in one call, and EP's update of every layer (``outer_product.c``).

The relaxation's layer update, per example (row-major states)::

    s_i ← g(c_i + a·(U_i s_{i−1}) + a·(D_iᵀ s_{i+1}) [+ ν·s_i at the output layer])

with the layer's constant c_i (the input drive for i = 0), σ = g(a·x + c), and ν = −a·β the
MSE nudge (its a·β·y already in the output constant); or, for a net that nudges its output
after σ (``model.nudge: post_activation``), ν = 0, no a·β·y, and at the output layer::

    s_{L−1} ← g(z_{L−1}) + β(y − s_{L−1})

For the prototypical net U_i = D_{i−1} = W_i; for the vector-field net D_i = B_{i+1}ᵀ. Every
example relaxes independently of the others: the kernel runs examples in pairs (in blocks of up to
6 on AVX2 builds, 12 on AVX-512, for nets past one hidden layer under a small output; and on
AVX-512 one example at a time through one pass a step for one hidden layer under at most 16
outputs) with their states and the couplings in cache, products, nudge and σ fused.
With a fixed number of steps an example stops computing once a step leaves its state unchanged
bit for bit: every further step would return that same state, so the result is that of all the
steps, to the bit.

Every function here returns False / None, having done nothing, when the library or the tensors
(CPU, float32, contiguous) do not allow it; the caller then runs torch, the definition.
"""

from __future__ import annotations

import ctypes

import torch

from eprun.native import build, parallel

ACTIVATION_CODES = {"sigmoid": 0, "hard_sigmoid": 1, "hard_sigmoid_half": 1, "tanh": 2}
MAX_LAYERS = 64
C_INT_MAX = (1 << 31) - 1  # the kernels take step counts as C ints
#: fewest steps worth a call: a single step is cheaper through torch than through the call's set-up
MIN_STEPS = 2

_p = ctypes.POINTER(ctypes.c_void_p)
_i64, _i32, _f, _v = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
build.declare("eprun_relax_dense", _i32, [
    _i32, ctypes.POINTER(_i64), _p, _p, ctypes.POINTER(_i32), _p, _p, _f, _i32, _f, _f, _v, _i32, _i32, _f, _i32,
    _v, _i64, _i32])
build.declare("eprun_ep_dense_phases", _i32, [
    _i32, ctypes.POINTER(_i64), _p, _p, _p, ctypes.POINTER(_i32), _v, _v, _f, _f, _p, _p, _f, _i32, _i32, _i32,
    _i32, _f, _i32, _v, _v, _v, _i64, _i32])
build.declare("eprun_ep_dense_update", _i32, [_i32, ctypes.POINTER(_i64), _v, _p, _p, _p, _p, _v, _f, _i64, _i32])
build.declare("eprun_add_outer", _i32, [_v, _v, _v, _i64, _i64, _i64, _f, _i32])
build.declare("eprun_add_outer_available", _i32)
build.declare("eprun_native_openmp", _i32)
build.declare("eprun_native_vectorized", _i32)
build.declare("eprun_native_avx512", _i32)


def cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def supports(state: list[torch.Tensor], *tensors: torch.Tensor, steps: int = MIN_STEPS) -> bool:
    """True when the kernel can run this relaxation: the library here, CPU float32 contiguous
    tensors, few enough layers, at least :data:`MIN_STEPS` steps."""
    if not MIN_STEPS <= steps <= C_INT_MAX or len(state) > MAX_LAYERS or not cpu_float32(*state, *tensors):
        return False
    return build.library() is not None


def array(kind, values):
    return (kind * len(values))(*values)


def _c_int(name: str, value: int) -> int:
    """``value`` as a C int, refused rather than wrapped when it does not fit."""
    if not 0 <= value <= C_INT_MAX:
        raise ValueError(f"{name} = {value} does not fit the kernel's 32-bit step counts")
    return int(value)


def pointers(tensors) -> ctypes.Array:
    return array(ctypes.c_void_p, [t.data_ptr() if t is not None else None for t in tensors])


def relax_dense(state: list[torch.Tensor], constant: list[torch.Tensor], up: list[torch.Tensor | None],
                down: list[torch.Tensor | None], scale: float, activation: str, nudge: float, steps: int,
                order: str, tol: float = 0.0, check_every: int = 1, count_steps: bool = False,
                after: tuple[float, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Run ``steps`` steps in place on ``state`` (the module's update).

    ``constant[i]`` is [batch, n_i] or [n_i]; ``up[i]`` = U_i, [n_i, n_{i−1}] (``up[0]`` is None);
    ``down[i]`` = D_i, [n_{i+1}, n_i] (``down[-1]`` is None); ``nudge`` ν = −a·β (0 when free).
    ``after`` = (β, y), y [batch, n_{L−1}]: the output nudged after σ instead, s ← g(z) + β(y − s)
    (``nudge`` then 0). The caller checked :func:`supports` for every tensor, y included.

    ``tol`` > 0: each example stops after the first step t (a multiple of ``check_every``) in
    which none of its states moved by ``tol`` or more; the steps each example took are returned
    ([batch] int32). With ``tol`` = 0 the result is that of ``steps`` steps and None is returned
    (or, with ``count_steps``, the steps each example computed before its bitwise fixed point).
    """
    lib = build.library()
    n = len(state)
    batch = state[0].shape[0]
    taken = torch.empty(batch, dtype=torch.int32) if tol > 0.0 or count_steps else None
    code = lib.eprun_relax_dense(
        n, array(ctypes.c_int64, [s.shape[1] for s in state]), pointers(state), pointers(constant),
        array(ctypes.c_int, [int(c.dim() == 2) for c in constant]), pointers(up), pointers(down), float(scale),
        ACTIVATION_CODES[activation], float(nudge), float(after[0]) if after else 0.0,
        after[1].data_ptr() if after else None, _c_int("steps", steps), int(order == "async"), float(tol),
        _c_int("check_every", check_every), taken.data_ptr() if taken is not None else None, batch,
        parallel.threads_for(lib, batch))
    if code != 0:
        raise MemoryError("the native relaxation could not allocate its scratch state")
    return taken


def ep_dense_phases(free: list[torch.Tensor], nudged: list[torch.Tensor], constant: list[torch.Tensor],
                    up: list[torch.Tensor | None], down: list[torch.Tensor | None], labels: torch.Tensor,
                    scale: float, activation: str, beta: float, free_steps: int, nudged_steps: int, order: str,
                    tol: float = 0.0, check_every: int = 1,
                    after: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both phases of one-sided EP with the MSE read-out in one call: ``free`` ← s* (``free_steps``
    steps from s = 0 with the constants c_i), ``nudged`` ← s^β (``nudged_steps`` steps from s*
    with a·β·y added to the output constant and ν = −a·β), y the one-hot code of ``labels``
    (int64, [batch]); with ``after``, the output nudged after σ instead (the constants kept,
    s ← g(z) + β(y − s) at the output). ``free`` and ``nudged`` are [batch, n_i] float32
    buffers, written whole; the other arguments are those of :func:`relax_dense`, checked by the
    caller with :func:`supports`. Each row range of the batch runs both phases on one thread: the
    same steps as two calls of :func:`relax_dense`.

    Returns (steps each example took in the free phase, in the nudged phase, [batch] int32;
    the MSE loss ½‖y − s*_out‖² per example, float32)."""
    lib = build.library()
    n = len(free)
    batch = free[0].shape[0]
    nudged_constant = torch.empty(batch, free[-1].shape[1])
    taken = torch.empty(2, batch, dtype=torch.int32)
    loss = torch.empty(batch)
    code = lib.eprun_ep_dense_phases(
        n, array(ctypes.c_int64, [s.shape[1] for s in free]), pointers(free), pointers(nudged),
        pointers(constant), array(ctypes.c_int, [int(c.dim() == 2) for c in constant]),
        nudged_constant.data_ptr(), labels.data_ptr(), float(scale * beta), float(beta) if after else 0.0,
        pointers(up), pointers(down), float(scale), ACTIVATION_CODES[activation], _c_int("free_steps", free_steps),
        _c_int("nudged_steps", nudged_steps), int(order == "async"), float(tol), _c_int("check_every", check_every),
        taken[0].data_ptr(), taken[1].data_ptr(), loss.data_ptr(), batch,
        parallel.threads_for(lib, batch))
    if code != 0:
        raise MemoryError("the native relaxation could not allocate its scratch state")
    return taken[0], taken[1], loss


def add_outer_available() -> bool:
    """True when :func:`add_outer_` and :func:`ep_dense_update` run compiled here (AVX-512 builds)."""
    lib = build.library()
    return lib is not None and bool(lib.eprun_add_outer_available())


def ep_dense_update(x: torch.Tensor, free: list[torch.Tensor], nudged: list[torch.Tensor],
                    weight_grads: list[torch.Tensor], bias_grads: list[torch.Tensor], c: float) -> bool:
    """EP's one-sided update of a dense chain accumulated into the gradients, with s⁰ = x
    [batch, n_0] and the states s¹ … s^L::

        G_0 += c·(s¹* − s¹β)ᵀ x,   G_n += c·(s^{n+1}*ᵀ s^n* − s^{n+1}βᵀ s^nβ),   g_{n+1} += c·Σ_b (s^{n+1}* − s^{n+1}β)

    ``free`` = s*, ``nudged`` = s^β. Returns False, having done nothing, when the tensors or the
    build do not allow it."""
    if not add_outer_available():
        return False
    n = len(free)
    batch = x.shape[0]
    sizes = [x.shape[1]] + [s.shape[1] for s in free]
    for i in range(n):
        if (weight_grads[i].shape != (sizes[i + 1], sizes[i]) or bias_grads[i].shape != (sizes[i + 1],)
                or free[i].shape != (batch, sizes[i + 1]) or nudged[i].shape != free[i].shape):
            return False
    if not cpu_float32(x, *free, *nudged, *weight_grads, *bias_grads):
        return False
    lib = build.library()
    diff = torch.empty(batch, sizes[1])
    code = lib.eprun_ep_dense_update(n, array(ctypes.c_int64, sizes), x.data_ptr(), pointers(free),
                                     pointers(nudged), pointers(weight_grads), pointers(bias_grads),
                                     diff.data_ptr(), float(c), batch, parallel.all_threads(lib))
    return code == 0


def add_outer_(out: torch.Tensor, a: torch.Tensor, x: torch.Tensor, alpha: float) -> bool:
    """out += α·aᵀx for out [n, m], a [batch, n], x [batch, m] (EP's update of the first weight
    matrix: its inner dimension is the batch, so it is mostly reading and writing ``out``).
    Returns False, having done nothing, when the tensors or the build do not allow it."""
    if not add_outer_available():
        return False
    batch, n = a.shape
    if out.shape != (n, x.shape[1]) or x.shape[0] != batch or not cpu_float32(out, a, x):
        return False
    lib = build.library()
    code = lib.eprun_add_outer(out.data_ptr(), a.data_ptr(), x.data_ptr(), batch, n, x.shape[1], float(alpha),
                               parallel.all_threads(lib))
    return code == 0
